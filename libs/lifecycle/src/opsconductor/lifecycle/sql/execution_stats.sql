-- Observed step durations (storage/execution_stats.py).

-- name: step_duration_p95
-- The p95 duration of each action ($1) over its steps that succeeded in the last $2 seconds, for
-- actions with $3 such steps at least.
SELECT action, percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms)::bigint AS p95
FROM execution_steps
WHERE status = 'succeeded' AND action = ANY($1::text[])
  AND ended_at > clock_timestamp() - make_interval(secs => $2)
GROUP BY action
HAVING count(*) >= $3
