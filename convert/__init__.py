"""`python -m convert INPUT OUTPUT_DIR`: PyTorch DeiT/timm checkpoints -> ats-jax checkpoints."""
