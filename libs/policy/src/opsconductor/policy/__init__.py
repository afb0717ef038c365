"""Who may do what: RBAC, audited denials, quotas and plan-policy enforcement."""
