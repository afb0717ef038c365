-- Counters of events that happen in short-lived processes (the reaper CronJob): kept in the
-- database, incremented by the statement that does the counted work, and exported by the
-- long-running api with its gauges (opsconductor.lifecycle.queue.gauges), so Prometheus
-- scrapes them however briefly the process that counted lived. Only ever incremented.
CREATE TABLE metric_counters (
    name VARCHAR(100) PRIMARY KEY,
    value BIGINT NOT NULL DEFAULT 0 CHECK (value >= 0)
);
INSERT INTO metric_counters (name) VALUES ('mutex_reaped');
