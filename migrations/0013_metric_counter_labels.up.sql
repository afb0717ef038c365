-- Stored counters with labels: the outcomes a reaper pass ends (name 'reaper_executions_ended',
-- labels mode, sla_class, action_class, status, error_class, timed_out; 'reaper_dlq_moves'),
-- counted by the statement that ends them and exported by the api (opsc_reaper_* counters).
-- Label values are bounded: enums, and the reaper's own error classes. Only ever incremented.
ALTER TABLE metric_counters ADD COLUMN labels JSONB NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE metric_counters DROP CONSTRAINT metric_counters_pkey;
ALTER TABLE metric_counters ADD PRIMARY KEY (name, labels);
INSERT INTO metric_counters (name) VALUES ('reaper_dlq_moves');
