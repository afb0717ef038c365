-- Every change of role_bindings notifies 'role_bindings_changed' (at commit, never for a
-- rolled-back change): the services' short-lived role caches (storage/role_cache.py) drop what
-- they hold, so a revoked binding is refused by the next check, not after the cache's lifetime.
-- A trigger, so no writer (opsctl, an operator's own SQL, old code during a rollout) can forget
-- it; per statement, so a bulk change notifies once.
CREATE FUNCTION role_bindings_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('role_bindings_changed', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER role_bindings_notify
AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON role_bindings
FOR EACH STATEMENT EXECUTE FUNCTION role_bindings_notify();
