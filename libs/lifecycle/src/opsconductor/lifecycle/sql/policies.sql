-- Timeout policies (storage/policies.py).

-- name: load_timeout_policies
-- Every timeout policy (the budget of an SLA class for an action class).
SELECT id, sla_class::text AS sla_class, action_class, execution_timeout_ms, step_timeout_ms,
       max_attempts, max_lease_renewals, lease_buffer_ms
FROM timeout_policies
