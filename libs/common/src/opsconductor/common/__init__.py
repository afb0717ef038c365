"""OpsConductor Execution shared core."""
