-- Role bindings (storage/role_bindings.py).

-- name: load_roles
-- The roles a principal holds in a tenant.
SELECT role FROM role_bindings WHERE tenant_id = $1 AND principal = $2

-- name: bind_role
-- Bind a role once: a row back only when it is new.
INSERT INTO role_bindings (tenant_id, principal, role, created_by)
VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, principal, role) DO NOTHING
RETURNING 1

-- name: unbind_role
-- Unbind a role: a row back only when it was bound.
DELETE FROM role_bindings WHERE tenant_id = $1 AND principal = $2 AND role = $3 RETURNING 1
