DROP INDEX IF EXISTS ix_locks_owner_execution;
DROP INDEX IF EXISTS ix_steps_succeeded_action_ended;
