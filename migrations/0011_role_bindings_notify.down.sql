DROP TRIGGER IF EXISTS role_bindings_notify ON role_bindings;
DROP FUNCTION IF EXISTS role_bindings_notify();
