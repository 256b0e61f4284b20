"""ats-jax: Adaptive Token Sampling (Fayyaz et al., ECCV 2022) for Flax vision transformers."""

from ats_jax.models.enable import ats_blocks, disable_ats, enable_ats

__all__ = ['ats_blocks', 'disable_ats', 'enable_ats']
