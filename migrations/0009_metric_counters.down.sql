DROP TABLE IF EXISTS metric_counters;
