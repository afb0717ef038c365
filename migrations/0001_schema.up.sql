-- Core schema of spec §1 plus DESIGN.md §3: enums, tables and CHECK constraints.
-- Indexes live in 0002 (created separately, spec §1.1); seed rows in 0003.

CREATE TYPE execution_status AS ENUM (
    'pending', 'awaiting_approval', 'queued', 'running',
    'succeeded', 'failed', 'cancelled', 'rejected'
);
CREATE TYPE execution_mode AS ENUM ('immediate', 'background');
CREATE TYPE sla_class AS ENUM ('fast', 'medium', 'long');
CREATE TYPE approval_state AS ENUM ('pending', 'approved', 'rejected', 'invalidated', 'expired');

CREATE TABLE timeout_policies (
    id                    VARCHAR(50) PRIMARY KEY,
    sla_class             sla_class   NOT NULL,
    action_class          VARCHAR(20) NOT NULL,
    execution_timeout_ms  INTEGER     NOT NULL,
    step_timeout_ms       INTEGER     NOT NULL,
    max_attempts          INTEGER     NOT NULL,
    max_lease_renewals    INTEGER     NOT NULL,
    lease_buffer_ms       INTEGER     NOT NULL DEFAULT 5000,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT timeout_policy_action_class CHECK (action_class IN ('read', 'modify', 'deploy')),
    CONSTRAINT timeout_policy_positive CHECK (
        execution_timeout_ms > 0 AND step_timeout_ms > 0
        AND step_timeout_ms <= execution_timeout_ms
        AND max_attempts > 0 AND max_lease_renewals >= 0 AND lease_buffer_ms >= 0
    )
);

CREATE TABLE executions (
    id                       UUID             PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id                VARCHAR(100)     NOT NULL,
    actor_id                 VARCHAR(200)     NOT NULL,
    request_id               VARCHAR(100),
    idempotency_key          VARCHAR(64)      NOT NULL,
    -- Set when the dedup window has passed: the key no longer blocks a new run of the same plan.
    idempotency_retired_at   TIMESTAMPTZ,
    plan_hash                VARCHAR(64)      NOT NULL,
    plan_snapshot            JSONB            NOT NULL,
    plan_snapshot_hash       VARCHAR(64)      NOT NULL,
    status                   execution_status NOT NULL DEFAULT 'pending',
    execution_mode           execution_mode   NOT NULL,
    sla_class                sla_class        NOT NULL,
    action_class             VARCHAR(20)      NOT NULL,
    approval_level           SMALLINT         NOT NULL DEFAULT 0,
    approval_id              UUID,
    priority                 SMALLINT         NOT NULL DEFAULT 50,
    timeout_policy_id        VARCHAR(50)      REFERENCES timeout_policies (id),
    timeout_ms               INTEGER          NOT NULL,
    timed_out                BOOLEAN          NOT NULL DEFAULT FALSE,
    estimated_duration_ms    BIGINT,
    deadline_at              TIMESTAMPTZ,
    record_only              BOOLEAN          NOT NULL DEFAULT FALSE,
    attempts                 INTEGER          NOT NULL DEFAULT 0,
    created_at               TIMESTAMPTZ      NOT NULL DEFAULT now(),
    started_at               TIMESTAMPTZ,
    ended_at                 TIMESTAMPTZ,
    updated_at               TIMESTAMPTZ      NOT NULL DEFAULT now(),
    cancelled_by             VARCHAR(200),
    cancelled_at             TIMESTAMPTZ,
    cancel_reason            TEXT,
    result_summary           JSONB,
    error_class              VARCHAR(100),
    error_message            TEXT,
    -- Observability (spec §1.4).
    worker_id                VARCHAR(100),
    lease_renewals           INTEGER          NOT NULL DEFAULT 0,
    cancel_checks_performed  INTEGER          NOT NULL DEFAULT 0,
    last_transition_at       TIMESTAMPTZ,
    last_transition_by       VARCHAR(200),
    last_transition_from     execution_status,
    -- Fencing: the lease token of the worker allowed to write; NULL on the immediate path.
    lease_token              UUID,
    -- Last event sequence number handed out for this execution.
    event_seq                BIGINT           NOT NULL DEFAULT 0,
    CONSTRAINT valid_cancellation CHECK ((cancelled_by IS NULL) = (cancelled_at IS NULL)),
    CONSTRAINT valid_result_size CHECK (
        result_summary IS NULL OR octet_length(result_summary::text) <= 10240
    ),
    CONSTRAINT valid_timing CHECK (
        (started_at IS NULL OR started_at >= created_at)
        AND (ended_at IS NULL OR started_at IS NULL OR ended_at >= started_at)
    ),
    CONSTRAINT valid_timeout CHECK (timeout_ms > 0),
    CONSTRAINT valid_approval_level CHECK (approval_level BETWEEN 0 AND 3),
    CONSTRAINT valid_priority CHECK (priority BETWEEN 0 AND 100),
    CONSTRAINT valid_action_class CHECK (action_class IN ('read', 'modify', 'deploy'))
);

CREATE TABLE execution_steps (
    execution_id     UUID         NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    step_id          VARCHAR(100) NOT NULL,
    position         INTEGER      NOT NULL,
    action           VARCHAR(100) NOT NULL,
    action_class     VARCHAR(20)  NOT NULL,
    status           VARCHAR(30)  NOT NULL DEFAULT 'pending',
    idempotency_key  VARCHAR(200) NOT NULL,
    attempt          INTEGER      NOT NULL DEFAULT 0,
    worker_id        VARCHAR(100),
    created_at       TIMESTAMPTZ  NOT NULL DEFAULT now(),
    started_at       TIMESTAMPTZ,
    ended_at         TIMESTAMPTZ,
    duration_ms      BIGINT,
    result           JSONB,
    error_class      VARCHAR(100),
    error_message    TEXT,
    PRIMARY KEY (execution_id, step_id),
    CONSTRAINT valid_step_status CHECK (
        status IN ('pending', 'running', 'succeeded', 'failed', 'skipped', 'awaiting_approval')
    ),
    CONSTRAINT valid_step_result_size CHECK (result IS NULL OR octet_length(result::text) <= 10240),
    CONSTRAINT valid_step_timing CHECK (ended_at IS NULL OR started_at IS NULL OR ended_at >= started_at),
    CONSTRAINT valid_step_position CHECK (position >= 0)
);

CREATE TABLE approvals (
    id                  UUID           PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id           VARCHAR(100)   NOT NULL,
    execution_id        UUID           NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    -- NULL for a whole-plan approval; the step id for a level-3 per-step approval.
    step_id             VARCHAR(100),
    level               SMALLINT       NOT NULL,
    state               approval_state NOT NULL DEFAULT 'pending',
    plan_hash           VARCHAR(64)    NOT NULL,
    plan_snapshot_hash  VARCHAR(64)    NOT NULL,
    requested_by        VARCHAR(200)   NOT NULL,
    runbook_url         TEXT,
    decided_by          VARCHAR(200),
    auth_method         VARCHAR(50),
    source_ip           VARCHAR(64),
    decided_at          TIMESTAMPTZ,
    comment             TEXT,
    created_at          TIMESTAMPTZ    NOT NULL DEFAULT now(),
    expires_at          TIMESTAMPTZ    NOT NULL,
    CONSTRAINT valid_approval_level CHECK (level BETWEEN 1 AND 3),
    CONSTRAINT approval_decision_recorded CHECK (
        state NOT IN ('approved', 'rejected')
        OR (decided_by IS NOT NULL AND decided_at IS NOT NULL AND auth_method IS NOT NULL)
    ),
    CONSTRAINT approval_not_self CHECK (decided_by IS NULL OR decided_by <> requested_by)
);

CREATE TABLE execution_events (
    id            BIGSERIAL     PRIMARY KEY,
    -- NULL for events not tied to an execution (e.g. an rbac_violation on a refused submit).
    execution_id  UUID          REFERENCES executions (id) ON DELETE CASCADE,
    tenant_id     VARCHAR(100)  NOT NULL,
    actor_id      VARCHAR(200),
    seq           BIGINT        NOT NULL DEFAULT 0,
    type          VARCHAR(100)  NOT NULL,
    payload       JSONB         NOT NULL DEFAULT '{}'::jsonb,
    created_at    TIMESTAMPTZ   NOT NULL DEFAULT now(),
    CONSTRAINT valid_event_seq CHECK ((execution_id IS NULL) = (seq = 0))
);

CREATE TABLE execution_queue (
    id                UUID          PRIMARY KEY DEFAULT gen_random_uuid(),
    execution_id      UUID          NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    tenant_id         VARCHAR(100)  NOT NULL,
    priority          SMALLINT      NOT NULL DEFAULT 50,
    state             VARCHAR(20)   NOT NULL DEFAULT 'ready',
    attempts          INTEGER       NOT NULL DEFAULT 0,
    max_attempts      INTEGER       NOT NULL,
    available_at      TIMESTAMPTZ   NOT NULL DEFAULT now(),
    lease_owner       VARCHAR(100),
    lease_token       UUID,
    lease_expires_at  TIMESTAMPTZ,
    lease_renewals    INTEGER       NOT NULL DEFAULT 0,
    enqueued_at       TIMESTAMPTZ   NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ   NOT NULL DEFAULT now(),
    last_error        JSONB,
    CONSTRAINT valid_queue_state CHECK (state IN ('ready', 'leased', 'delayed')),
    CONSTRAINT valid_queue_priority CHECK (priority BETWEEN 0 AND 100),
    CONSTRAINT valid_queue_attempts CHECK (attempts >= 0 AND max_attempts > 0),
    CONSTRAINT valid_queue_lease CHECK (
        (state = 'leased') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)
    )
);

CREATE TABLE execution_dlq (
    id             UUID          PRIMARY KEY DEFAULT gen_random_uuid(),
    execution_id   UUID          NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    tenant_id      VARCHAR(100)  NOT NULL,
    attempts       INTEGER       NOT NULL,
    error_class    VARCHAR(100),
    error_message  TEXT,
    last_error     JSONB,
    created_at     TIMESTAMPTZ   NOT NULL DEFAULT now(),
    requeued_at    TIMESTAMPTZ,
    requeued_by    VARCHAR(200),
    CONSTRAINT valid_dlq_requeue CHECK ((requeued_at IS NULL) = (requeued_by IS NULL))
);

CREATE SEQUENCE execution_lock_fencing_seq;

CREATE TABLE execution_locks (
    -- lock:v1:{tenant_id}:{target_ref}:{action}
    lock_key            VARCHAR(600)  PRIMARY KEY,
    tenant_id           VARCHAR(100)  NOT NULL,
    target_ref          VARCHAR(300)  NOT NULL,
    action              VARCHAR(100)  NOT NULL,
    owner_token         UUID          NOT NULL,
    owner_execution_id  UUID,
    fencing_token       BIGINT        NOT NULL DEFAULT nextval('execution_lock_fencing_seq'),
    acquired_at         TIMESTAMPTZ   NOT NULL DEFAULT now(),
    expires_at          TIMESTAMPTZ   NOT NULL,
    CONSTRAINT valid_lock_expiry CHECK (expires_at > acquired_at)
);

CREATE TABLE feature_flags (
    name        VARCHAR(100) PRIMARY KEY,
    value       JSONB        NOT NULL,
    updated_at  TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_by  VARCHAR(200) NOT NULL DEFAULT 'migration'
);

CREATE TABLE role_bindings (
    tenant_id   VARCHAR(100) NOT NULL,
    principal   VARCHAR(200) NOT NULL,
    role        VARCHAR(100) NOT NULL,
    created_at  TIMESTAMPTZ  NOT NULL DEFAULT now(),
    created_by  VARCHAR(200) NOT NULL DEFAULT 'system',
    PRIMARY KEY (tenant_id, principal, role)
);
