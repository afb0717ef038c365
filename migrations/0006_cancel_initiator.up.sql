-- Who initiated a cancellation: a person ('user') or the platform's own automation ('system',
-- a machine identity). Metrics keep the two apart (spec §7.2): neither is a failure, and
-- a person's cancellation is not the system misbehaving. Set with cancelled_by, by the same
-- statement; NULL when not cancelled (and for cancellations recorded before this column).
ALTER TABLE executions ADD COLUMN cancel_initiator VARCHAR(10);
ALTER TABLE executions ADD CONSTRAINT valid_cancel_initiator CHECK (
    cancel_initiator IS NULL
    OR (cancel_initiator IN ('user', 'system') AND cancelled_by IS NOT NULL)
);
