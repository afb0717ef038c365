DROP TRIGGER IF EXISTS feature_flags_record_change ON feature_flags;
DROP FUNCTION IF EXISTS feature_flags_record_change();
DROP TABLE IF EXISTS feature_flag_changes;
