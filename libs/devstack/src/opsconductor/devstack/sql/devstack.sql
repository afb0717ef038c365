-- The devstack's statements: seeding a database for the benches and the plan test
-- (devstack/seed.py), and the embedded stack's database (devstack/supervisor.py).

-- name: seed_timeout_policy
-- The timeout policy every seeded execution runs under.
SELECT id, execution_timeout_ms, step_timeout_ms, max_attempts, max_lease_renewals
FROM timeout_policies WHERE id = $1

-- name: seeded_queue_rows
-- Every queue row with what its Redis job needs (the renewal limit of its policy, its request
-- id), in the queue's order: pushed into an empty Redis as their submits did.
SELECT q.id, q.execution_id, q.tenant_id, q.priority, q.max_attempts, q.available_at,
       q.state, q.attempts, p.max_lease_renewals, e.request_id
FROM execution_queue q JOIN executions e ON e.id = q.execution_id
LEFT JOIN timeout_policies p ON p.id = e.timeout_policy_id
ORDER BY q.priority, q.enqueued_at, q.id

-- name: database_exists
-- Whether the database $1 exists on the server.
SELECT 1 FROM pg_database WHERE datname = $1
