"""ats-jax: Adaptive Token Sampling (Fayyaz et al., ECCV 2022) for Flax vision transformers."""
