DROP TRIGGER IF EXISTS execution_events_chain ON execution_events;
DROP FUNCTION IF EXISTS execution_events_chain();
DROP FUNCTION IF EXISTS execution_event_canonical(UUID, BIGINT, TEXT, TEXT, TEXT, JSONB, TIMESTAMPTZ);
ALTER TABLE execution_events DROP COLUMN IF EXISTS hash;
