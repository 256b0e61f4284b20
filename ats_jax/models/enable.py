"""Turn ATS on or off in a model you already have: same parameters, no reload."""

from __future__ import annotations

from collections.abc import Sequence

from ats_jax.models import ats, vit


def enable_ats(
  model: vit.VisionTransformer,
  blocks: Sequence[int] = (),
  num_tokens: float | Sequence[float] = 197,
) -> vit.VisionTransformer:
  """Makes `blocks` of `model` ATS blocks with caps `num_tokens` (as `create_model`'s `ats_blocks`
  and `num_tokens`); every other block becomes dense. `blocks=()` turns ATS off.

  ATS is parameter-free, so this only resets each block's static `sampling`: the parameters are
  untouched and the result equals a model created with these settings. Returns `model` (changed in
  place); jitted functions retrace for the new setting.
  """
  depth = len(model.blocks)
  tokens_in = model.pos_embed.shape[1]  # patches + prefix tokens
  plan = ats.sampling_plan(depth, tokens_in, model.num_prefix_tokens, tuple(blocks), num_tokens)
  for block, sampling in zip(model.blocks, plan, strict=True):
    block.sampling = sampling
  return model


def disable_ats(model: vit.VisionTransformer) -> vit.VisionTransformer:
  """The dense model: every block attends to all its tokens (same parameters)."""
  return enable_ats(model, blocks=())


def ats_blocks(model: vit.VisionTransformer) -> tuple[int, ...]:
  """The indices of the model's ATS blocks."""
  return tuple(i for i, b in enumerate(model.blocks) if b.sampling is not None)
