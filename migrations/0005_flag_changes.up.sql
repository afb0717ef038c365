-- Every feature-flag write is recorded: who, when, the flag, its old and new value
-- (AdminService/ListFlagChanges, `opsctl flags history`; docs/rollout.md).
--
-- A trigger on feature_flags writes the record in the statement that changes the flag: no
-- extra round trip, and no writer can skip it — the api (UpdateFeatureFlags, SetDrain), the
-- previous release during a rollout, or an operator's psql. Who is the row's updated_by (the
-- api sets it to the authenticated principal); a write that does not set it is recorded under
-- whatever the row holds, so an anonymous UPDATE still leaves a trace of when and what.
-- old_value is NULL when the flag had no row (its default applied); new_value is NULL for a
-- deleted row (the flag back to its default).

CREATE TABLE feature_flag_changes (
    id          UUID         PRIMARY KEY DEFAULT gen_random_uuid(),
    flag        VARCHAR(100) NOT NULL,
    old_value   JSONB,
    new_value   JSONB,
    changed_by  VARCHAR(200) NOT NULL,
    changed_at  TIMESTAMPTZ  NOT NULL DEFAULT clock_timestamp()
);

-- No index: flags change a few times a day at most, so the newest-first listing sorts a small
-- table (and indexes are created apart from their tables, spec §1.1).

CREATE FUNCTION feature_flags_record_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO feature_flag_changes (flag, old_value, new_value, changed_by)
        VALUES (OLD.name, OLD.value, NULL, OLD.updated_by);
        RETURN OLD;
    END IF;
    INSERT INTO feature_flag_changes (flag, old_value, new_value, changed_by)
    VALUES (
        NEW.name,
        CASE WHEN TG_OP = 'UPDATE' THEN OLD.value END,
        NEW.value,
        NEW.updated_by
    );
    RETURN NEW;
END
$$;

CREATE TRIGGER feature_flags_record_change
AFTER INSERT OR UPDATE OR DELETE ON feature_flags
FOR EACH ROW EXECUTE FUNCTION feature_flags_record_change();

-- The changes made before this migration are in the audit events of the system tenant
-- (feature_flags_updated: changes, previous): carry them over so the history starts at the
-- beginning.
INSERT INTO feature_flag_changes (flag, old_value, new_value, changed_by, changed_at)
SELECT c.key,
       e.payload -> 'previous' -> c.key,
       c.value,
       COALESCE(e.actor_id, 'unknown'),
       e.created_at
FROM execution_events e
CROSS JOIN LATERAL jsonb_each(e.payload -> 'changes') AS c(key, value)
WHERE e.type = 'feature_flags_updated'
  AND jsonb_typeof(e.payload -> 'changes') = 'object';
