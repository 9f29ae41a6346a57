"""Code that runs inside Ray workers (the Train loop, aggregation, checkpoints)."""
