"""What a run keeps on disk: checkpoints, the run lock, the run directory's layout,
tracking."""
