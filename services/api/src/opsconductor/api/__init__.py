"""The api service of OpsConductor Execution: ExecutionService and AdminService."""
