-- The 6 timeout policies of DESIGN.md §3 and the dark-launch defaults of §7 (Stage E off).
INSERT INTO timeout_policies
    (id, sla_class, action_class, execution_timeout_ms, step_timeout_ms, max_attempts, max_lease_renewals)
VALUES
    ('fast_read',     'fast',   'read',    10000,  10000, 3, 1),
    ('fast_modify',   'fast',   'modify',  10000,  10000, 3, 1),
    ('medium_read',   'medium', 'read',    30000,  30000, 5, 3),
    ('medium_modify', 'medium', 'modify',  30000,  30000, 5, 3),
    ('medium_deploy', 'medium', 'deploy',  30000,  30000, 5, 3),
    ('long_deploy',   'long',   'deploy', 600000, 300000, 3, 10)
ON CONFLICT (id) DO NOTHING;

INSERT INTO feature_flags (name, value) VALUES
    ('stage_e_enabled',      'false'::jsonb),
    ('all_tenants_enabled',  'false'::jsonb),
    ('enabled_tenants',      '[]'::jsonb),
    ('record_only_tenants',  '[]'::jsonb),
    ('max_approval_level',   '0'::jsonb),
    ('dispatch_paused',      'false'::jsonb)
ON CONFLICT (name) DO NOTHING;
