-- Indexes, created apart from their tables (spec §1.1).

-- Idempotency (spec §1.2): tenant-scoped; a key retired after the dedup window no longer blocks.
CREATE UNIQUE INDEX ux_exec_tenant_idem
    ON executions (tenant_id, idempotency_key) WHERE idempotency_retired_at IS NULL;
CREATE INDEX ix_exec_tenant_created ON executions (tenant_id, created_at DESC, id DESC);
CREATE INDEX ix_exec_tenant_status ON executions (tenant_id, status, created_at DESC);
CREATE INDEX ix_exec_deadline_running ON executions (deadline_at) WHERE status = 'running';
CREATE INDEX ix_exec_retire_candidates ON executions (ended_at)
    WHERE idempotency_retired_at IS NULL AND ended_at IS NOT NULL;

CREATE UNIQUE INDEX ux_timeout_policy_class ON timeout_policies (sla_class, action_class);

CREATE UNIQUE INDEX ux_step_position ON execution_steps (execution_id, position);

CREATE INDEX ix_approvals_tenant_pending ON approvals (tenant_id, created_at) WHERE state = 'pending';
CREATE INDEX ix_approvals_execution ON approvals (execution_id);
-- At most one open approval per execution and step.
CREATE UNIQUE INDEX ux_approvals_one_pending
    ON approvals (execution_id, COALESCE(step_id, '')) WHERE state = 'pending';

CREATE UNIQUE INDEX ux_events_exec_seq ON execution_events (execution_id, seq)
    WHERE execution_id IS NOT NULL;
CREATE INDEX ix_events_tenant_type ON execution_events (tenant_id, type, created_at);
CREATE INDEX ix_events_tenant_actor ON execution_events (tenant_id, actor_id, created_at);

CREATE UNIQUE INDEX ux_queue_execution ON execution_queue (execution_id);
CREATE INDEX ix_queue_lease_expiry ON execution_queue (lease_expires_at) WHERE state = 'leased';
CREATE INDEX ix_queue_ready ON execution_queue (priority, enqueued_at) WHERE state = 'ready';

CREATE INDEX ix_dlq_tenant ON execution_dlq (tenant_id, created_at DESC);
CREATE INDEX ix_dlq_execution ON execution_dlq (execution_id);

CREATE INDEX ix_locks_expiry ON execution_locks (expires_at);
CREATE INDEX ix_locks_owner ON execution_locks (owner_token);

CREATE INDEX ix_role_bindings_principal ON role_bindings (principal);
