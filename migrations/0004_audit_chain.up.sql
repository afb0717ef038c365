-- Tamper-evident audit trail: every event of an execution carries
--     hash = sha256(hash of the previous event of that execution || canonical text of this event)
-- (the first event chains from the empty string), so altering, deleting or reordering recorded
-- events breaks the chain at the first affected seq (AdminService/VerifyAuditChain).
--
-- The hash is computed by a BEFORE INSERT trigger, in the statement that writes the event: no
-- extra round trip, and no writer (old code during a rollout included) can forget it. Writers
-- of one execution are serialized by the row lock of `UPDATE executions SET event_seq = ...`
-- that hands out seq (storage/events.py), held to commit; each plpgsql statement in READ
-- COMMITTED takes a fresh snapshot, so the trigger sees the previous event (committed by the
-- previous lock holder, or written earlier in this transaction). The unique (execution_id, seq)
-- index makes a fork (two events chaining from one predecessor) impossible.
-- Events of no execution (seq 0, e.g. a refused submit's rbac_violation) are not chained.

ALTER TABLE execution_events ADD COLUMN hash BYTEA;

-- The canonical text of an event: the jsonb rendering of its recorded columns (jsonb orders
-- keys and spacing deterministically; the timestamp is rendered in UTC with microseconds so
-- the session's TimeZone cannot change it). The verifier hashes what this returns for the rows
-- as they are now; an auditor can reproduce it with this one SELECT.
CREATE FUNCTION execution_event_canonical(
    execution_id UUID, seq BIGINT, tenant_id TEXT, actor_id TEXT, type TEXT, payload JSONB,
    created_at TIMESTAMPTZ
) RETURNS TEXT
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'execution_id', execution_id::text,
        'seq', seq,
        'tenant_id', tenant_id,
        'actor_id', actor_id,
        'type', type,
        'payload', payload,
        'created_at', to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    )::text
$$;

CREATE FUNCTION execution_events_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    previous BYTEA;
BEGIN
    IF NEW.execution_id IS NULL THEN
        NEW.hash := NULL;
        RETURN NEW;
    END IF;
    IF NEW.seq > 1 THEN
        SELECT e.hash INTO previous FROM execution_events AS e
        WHERE e.execution_id = NEW.execution_id AND e.seq = NEW.seq - 1;
    END IF;
    -- A missing predecessor (deleted by hand) chains from the empty string: the verifier
    -- reports the gap; refusing the write would stop the execution instead.
    NEW.hash := sha256(
        coalesce(previous, ''::bytea)
        || convert_to(
            execution_event_canonical(
                NEW.execution_id, NEW.seq, NEW.tenant_id, NEW.actor_id, NEW.type, NEW.payload,
                NEW.created_at
            ),
            'UTF8'
        )
    );
    RETURN NEW;
END
$$;

CREATE TRIGGER execution_events_chain BEFORE INSERT ON execution_events
FOR EACH ROW EXECUTE FUNCTION execution_events_chain();

-- Chain the events recorded before this migration, in seq order per execution.
DO $$
DECLARE
    event RECORD;
    chained_execution UUID;
    previous BYTEA;
BEGIN
    FOR event IN
        SELECT id, execution_id, seq, tenant_id, actor_id, type, payload, created_at
        FROM execution_events WHERE execution_id IS NOT NULL ORDER BY execution_id, seq
    LOOP
        IF chained_execution IS DISTINCT FROM event.execution_id THEN
            chained_execution := event.execution_id;
            previous := ''::bytea;
        END IF;
        previous := sha256(
            previous
            || convert_to(
                execution_event_canonical(
                    event.execution_id, event.seq, event.tenant_id, event.actor_id, event.type,
                    event.payload, event.created_at
                ),
                'UTF8'
            )
        );
        UPDATE execution_events SET hash = previous WHERE id = event.id;
    END LOOP;
END
$$;
