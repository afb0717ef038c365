ALTER TABLE executions DROP CONSTRAINT IF EXISTS valid_cancel_initiator;
ALTER TABLE executions DROP COLUMN IF EXISTS cancel_initiator;
