"""Adaptive token sampling as pure, fixed-shape functions (`docs/ats_spec.md`, steps 1-7).

Everything is per image: padded tokens (mask 0) take no part in the sort, the CDF or the grid, so an
image samples the same tokens whatever shares its batch. Shapes never depend on the data: the kept
tokens come first, padded to a static count, with a validity mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def value_norms(v: jax.Array) -> jax.Array:
  """||v_j|| over all heads: v [..., C] (heads side by side) -> [...] float32."""
  return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=-1))


def token_scores(cls_attn: jax.Array, v_norm: jax.Array, num_prefix_tokens: int) -> jax.Array:
  """Significance of each image token: cls attention summed over heads times ||v_j||.

  cls_attn [B, H, N] (the cls query's attention row), v_norm [B, N] (`value_norms`) -> [B, N - P]
  float32 summing to 1 per image. Masked tokens have v = 0, hence score 0. Prefix tokens (cls, dist)
  are dropped.
  """
  scores = (cls_attn.sum(axis=1) * v_norm)[:, num_prefix_tokens:]  # [B, M]
  return scores / scores.sum(axis=-1, keepdims=True)


def normalized_cdf(sorted_scores: jax.Array, num_real: jax.Array) -> jax.Array:
  """Cumulative sum min-max normalised over the real tokens: c[0] = 0, c[num_real - 1] = 1.

  sorted_scores [B, M] ascending with the real tokens first; positions >= num_real become +inf so
  that no grid point ever lands on them.
  """
  cdf = jnp.cumsum(sorted_scores, axis=-1)  # [B, M]
  lo = cdf[:, :1]
  hi = jnp.take_along_axis(cdf, (num_real - 1)[:, None], axis=-1)
  span = hi - lo
  cdf = jnp.where(span > 0, (cdf - lo) / jnp.where(span > 0, span, 1.0), 0.0)
  real = jnp.arange(cdf.shape[-1]) < num_real[:, None]
  return jnp.where(real, cdf, jnp.inf)


def _first_at_least(sorted_rows: jax.Array, values: jax.Array, search: str) -> jax.Array:
  """Per row, the first position whose value is >= each of `values` (a binary search, not a
  [B, G, M] comparison): sorted_rows [B, M] ascending, values [B, G] -> [B, G] in [0, M].
  `search`: `jnp.searchsorted`'s method (`ats_jax.backend.search_method`)."""
  search = functools.partial(jnp.searchsorted, side='left', method=search)
  return jax.vmap(search)(sorted_rows, values)


def inverse_transform(cdf: jax.Array, grid_size: int, search: str = 'scan') -> jax.Array:
  """Picks, per grid point, the sorted position whose CDF is nearest (first on ties): [B, G].

  The grid runs evenly from the smallest non-zero CDF value y0 to 1, so the lowest-scored token
  (c = 0) is never picked. An image whose CDF has no non-zero value (one real token, or all score
  mass on the top token) gets y0 = 1: it keeps its top token only. The spec leaves this case open.
  The CDF ascends, so the nearest value to y is the first one >= y or the one just below it (the
  first of its copies when tied): two binary searches instead of a [B, G, M] argmin.
  """
  m = cdf.shape[-1]
  y0 = jnp.min(jnp.where(cdf > 0, cdf, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
  y0 = jnp.where(jnp.isfinite(y0), y0, 1.0)
  steps = jnp.arange(grid_size, dtype=jnp.float32) / max(grid_size - 1, 1)
  grid = y0 + steps * (1.0 - y0)  # [B, G]
  above = _first_at_least(cdf, grid, search)  # [B, G]
  take = functools.partial(jnp.take_along_axis, axis=-1, mode='promise_in_bounds')
  over, under = take(cdf, jnp.minimum(above, m - 1)), take(cdf, jnp.maximum(above - 1, 0))
  up = jnp.where(above < m, over - grid, jnp.inf)  # |y - c| of the first c >= y
  down = jnp.where(above > 0, grid - under, jnp.inf)  # ... of the last c < y
  return jnp.where(
    down <= up, _first_at_least(cdf, under, search), above
  )  # ties: the lower position


def sample_tokens(
  scores: jax.Array, real: jax.Array, grid_size: int, max_kept: int, search: str = 'scan'
) -> tuple[jax.Array, jax.Array]:
  """Image tokens kept by ATS, in ascending score order, padded to `max_kept` slots.

  scores [B, M] (from `token_scores`), real [B, M] bool (False = padded slot). Returns token indices
  [B, max_kept] into the M image tokens and their validity [B, max_kept]. When more than `max_kept`
  distinct tokens are picked, the highest-scored are kept (our extension: the original crashes).
  `search`: the binary searches' method ('scan_unrolled': no loops).
  """
  m = scores.shape[-1]
  order = jnp.argsort(jnp.where(real, scores, jnp.inf), axis=-1, stable=True)  # [B, M] ascending
  num_real = real.sum(axis=-1)  # [B]
  sorted_scores = jnp.where(
    jnp.arange(m) < num_real[:, None], jnp.take_along_axis(scores, order, axis=-1), 0.0
  )
  picks = inverse_transform(
    normalized_cdf(sorted_scores, num_real), grid_size, search
  )  # [B, G] ascending
  positions = jnp.broadcast_to(jnp.arange(m), (picks.shape[0], m))
  first = _first_at_least(picks, positions, search)  # [B, M]: the first pick >= each position
  hit = jnp.take_along_axis(picks, jnp.minimum(first, picks.shape[1] - 1), axis=-1)
  picked = (first < picks.shape[1]) & (hit == positions)  # [B, M]; no scatter: shards cleanly
  picked_above = jnp.cumsum(picked[:, ::-1], axis=-1)[:, ::-1]  # picks at sorted positions >= i
  keep = picked & (picked_above <= max_kept)  # [B, M]: the top `max_kept` distinct picks
  # the kept positions in order, by binary search where a second sort cost as much as the first:
  # slot j takes the first position where the running count of kept ones reaches j + 1
  ranks = jnp.cumsum(keep, axis=-1, dtype=jnp.int32)  # [B, M] ascending
  wanted = jnp.broadcast_to(jnp.arange(1, max_kept + 1, dtype=jnp.int32), (keep.shape[0], max_kept))
  slots = jnp.minimum(
    _first_at_least(ranks, wanted, search), m - 1
  )  # [B, K']; past the count: invalid
  valid = jnp.arange(max_kept) < keep.sum(axis=-1, keepdims=True)  # [B, K']
  return jnp.take_along_axis(order, slots, axis=-1), valid
