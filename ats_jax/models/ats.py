"""Adaptive token sampling wired into a transformer block (`docs/ats_spec.md`).

An ATS block is a plain `Block` with a `Sampling` setting: it uses exactly the block's own modules
(norm1, attn, norm2, mlp), so an ATS model has the dense model's parameter tree and loads the same
checkpoints.

Distilled DeiT (beyond the original, which has no such model): the dist token is treated like cls,
always kept right after it and never scored or sampled; the grid has one point per image token
entering the network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ats_jax.ops import attention as attention_ops
from ats_jax.ops import token_sampling

MIN_TOKENS = 8  # the original never keeps fewer than 8 tokens


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Static setting of one ATS block: its output slots `cap` (K), prefix tokens, grid points."""

  cap: int
  num_prefix_tokens: int
  grid_size: int


def token_cap(num_tokens: float, tokens_in: int) -> int:
  """The cap K: a ratio of `tokens_in` when <= 1, else a count; rounded, clipped to [8, N]."""
  cap = round(num_tokens * tokens_in) if num_tokens <= 1 else round(num_tokens)
  return min(tokens_in, max(MIN_TOKENS, cap))


def sampling_plan(
  depth: int,
  num_tokens_in: int,
  num_prefix_tokens: int,
  ats_blocks: Sequence[int],
  num_tokens: float | Sequence[float],
) -> list[Sampling | None]:
  """Per block: its `Sampling`, or None for a plain block. Caps follow the static token counts.

  `num_tokens` is one cap for every ATS block (a number, or a sequence of one) or one per block.
  """
  ats_blocks = list(ats_blocks)
  bad = [i for i in ats_blocks if not 0 <= i < depth]
  if bad or len(set(ats_blocks)) != len(ats_blocks):
    raise ValueError(f'ats_blocks {ats_blocks} must be distinct block indices in [0, {depth})')
  caps = [num_tokens] if isinstance(num_tokens, int | float) else list(num_tokens)
  caps = caps * len(ats_blocks) if len(caps) == 1 else caps  # one cap serves every ATS block
  if len(caps) != len(ats_blocks) or any(c <= 0 for c in caps):
    raise ValueError(
      f'num_tokens {num_tokens} must be one positive number or one per ATS block {ats_blocks}'
    )
  plan: list[Sampling | None] = []
  tokens, grid = num_tokens_in, num_tokens_in - num_prefix_tokens
  cap_of = dict(zip(ats_blocks, caps, strict=True))
  for i in range(depth):
    if i in cap_of:
      tokens = token_cap(cap_of[i], tokens)
      plan.append(Sampling(tokens, num_prefix_tokens, grid))
    else:
      plan.append(None)
  return plan


def sample(
  logits: jax.Array,
  v_norm: jax.Array,
  mask: jax.Array | None,
  sampling: Sampling,
  search: str = 'scan',
) -> tuple[jax.Array, jax.Array]:
  """The tokens an ATS block keeps, scored with the cls row of its attention.

  logits [B, N, H] (each token's against the cls query, `attention.cls_logits`) and v_norm [B, N]
  (`token_sampling.value_norms`), both 0 at padded tokens; mask [B, N] or None -> the kept rows
  [B, K] (input slots: prefix tokens, then the picks) and their mask [B, K] float. K is the cap, or
  N when fewer slots come in. Only the cls query's row of attention is computed: the block then
  attends the kept rows alone. `search`: the binary searches' method (`ats_jax.backend`).
  """
  b, n, _ = logits.shape
  p = sampling.num_prefix_tokens
  cap = min(sampling.cap, n)
  mask = jnp.ones((b, n), jnp.float32) if mask is None else mask.astype(jnp.float32)
  logits = logits.transpose(0, 2, 1)[:, :, None]  # [B, H, 1, N]: the cls query's row
  cls_attn = attention_ops.masked_softmax(logits, mask)[:, :, 0]  # [B, H, N]
  scores = token_sampling.token_scores(cls_attn, v_norm, p)  # [B, N - P]
  picked, valid = token_sampling.sample_tokens(
    scores, mask[:, p:] > 0, sampling.grid_size, cap - p, search
  )
  rows = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (b, p)), picked + p], axis=1)  # [B, K]
  kept = jnp.concatenate([jnp.ones((b, p), bool), valid], axis=1).astype(jnp.float32)
  return rows, kept
