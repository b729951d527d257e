"""Scene exports: pure writers from prediction arrays to file bytes."""
