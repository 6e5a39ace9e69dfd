"""mtckpt: multi-tier checkpointing for ML training."""
