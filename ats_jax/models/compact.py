"""Compacted execution: after ATS, run each block on only as many tokens as the batch still has.

With fixed shapes a block costs the same whether ATS kept 40 tokens or 197. Here each block after
the first ATS block picks, inside the compiled program, the smallest size of a ladder (multiples of
`step`, then the full count) that holds the fullest image of the batch, runs on that many leading
slots (kept tokens are always first), and pads its output back to the static shape. `lax.switch`
executes only the branch taken, so XLA runs the smaller block. Padded slots never reach a kept
token, so the results are the padded mode's, up to the `eps / N` term of the reference's masked
softmax, N being the padded length (the original cuts to the batch's largest count the same way).
"""

from __future__ import annotations

import bisect

import jax
import jax.numpy as jnp


def ladder(num_tokens: int, step: int) -> list[int]:
  """Sizes a block with `num_tokens` slots may run at: multiples of `step` below it, then itself."""
  return list(range(step, num_tokens, step)) + [num_tokens]


def bucket(sizes: list[int], needed: int) -> int:
  """Index of the smallest size that holds `needed` tokens (host-side twin of `bucket_index`)."""
  return bisect.bisect_left(sizes, needed)


def bucket_index(sizes: list[int], mask: jax.Array) -> jax.Array:
  """Index of the smallest size holding the fullest image's real tokens; mask [B, N]."""
  needed = jnp.max(jnp.sum(mask > 0, axis=-1))
  return jnp.searchsorted(jnp.asarray(sizes), needed, side='left')


def _pad_to(x: jax.Array, size: int) -> jax.Array:
  """Zero rows after axis 1's end up to `size`: padded slots, as the padded mode has them."""
  return jnp.pad(x, [(0, 0), (0, size - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def run_compacted(block, x: jax.Array, mask: jax.Array, step: int, out_size: int):
  """block(x, mask) on the smallest ladder size that holds every image's tokens.

  x [B, N, C], mask [B, N] (real tokens first) -> the block's x [B, out_size, C], mask.
  """
  sizes = ladder(x.shape[1], step)

  def branch(size: int):
    def run(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
      y, m = block(x[:, :size], mask[:, :size])  # [B, <= size, C]
      return _pad_to(y, out_size), _pad_to(m.astype(mask.dtype), out_size)

    return run

  return jax.lax.switch(bucket_index(sizes, mask), [branch(s) for s in sizes], x, mask)
