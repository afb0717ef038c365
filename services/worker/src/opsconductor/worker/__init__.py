"""The worker service of OpsConductor Execution: WorkerService."""
