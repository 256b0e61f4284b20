"""Training and evaluation: pure steps, the loop, optimiser, sharding, checkpoints, runtime."""
