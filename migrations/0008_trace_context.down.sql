ALTER TABLE executions DROP COLUMN IF EXISTS trace_context;
