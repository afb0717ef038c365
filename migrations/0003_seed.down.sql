DELETE FROM feature_flags WHERE name IN (
    'stage_e_enabled', 'all_tenants_enabled', 'enabled_tenants',
    'record_only_tenants', 'max_approval_level', 'dispatch_paused'
);
DELETE FROM timeout_policies WHERE id IN (
    'fast_read', 'fast_modify', 'medium_read', 'medium_modify', 'medium_deploy', 'long_deploy'
);
