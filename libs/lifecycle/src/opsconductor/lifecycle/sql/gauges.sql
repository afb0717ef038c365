-- Gauges read from Postgres (queue/gauges.py).

-- name: stored_counters
-- Every counter stored in Postgres by processes that may be gone before a scrape.
SELECT name, labels, value FROM metric_counters

-- name: pending_approvals_by_level
-- Unexpired pending approval requests, counted by level.
SELECT level, count(*) AS n FROM approvals
WHERE state = 'pending' AND expires_at > clock_timestamp()
GROUP BY level
