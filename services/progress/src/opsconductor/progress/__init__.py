"""The progress service of OpsConductor Execution: ProgressService."""
