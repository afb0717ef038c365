-- Two statements of the hot paths read a whole table for want of an index; found by
-- tests/integration/test_hot_query_plans.py, which explains every statement the services send
-- on a seeded database (docs/capacity.md, "Indexes").
--
-- The duration estimate a submit consults (opsconductor.lifecycle.storage.execution_stats:
-- p95 of the plan's actions' succeeded steps over the last day, cached 60 s per process) was a
-- Seq Scan of execution_steps, a table that grows by a row per step for ever: at a million steps
-- a cache miss cost a submit a full scan. Partial on succeeded steps, keyed for the action and
-- the window, duration included: an index-only scan of the window's rows.
CREATE INDEX ix_steps_succeeded_action_ended ON execution_steps (action, ended_at)
    INCLUDE (duration_ms) WHERE status = 'succeeded';

-- Releasing an execution's locks at its end (opsconductor.lifecycle.storage.locks, every
-- settle) selects them by owner_execution_id, which no index covered (ix_locks_owner is the
-- owner token's): a Seq Scan of every lock held, serialised behind the row locks it takes.
CREATE INDEX ix_locks_owner_execution ON execution_locks (owner_execution_id);
