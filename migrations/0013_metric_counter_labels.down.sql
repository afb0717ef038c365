DELETE FROM metric_counters WHERE labels <> '{}'::jsonb OR name = 'reaper_dlq_moves';
ALTER TABLE metric_counters DROP CONSTRAINT metric_counters_pkey;
ALTER TABLE metric_counters ADD PRIMARY KEY (name);
ALTER TABLE metric_counters DROP COLUMN labels;
