"""Getting weights from checkpoints into memory the model math can read."""
