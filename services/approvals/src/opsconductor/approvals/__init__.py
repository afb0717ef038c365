"""The approvals service of OpsConductor Execution: ApprovalService."""
