"""Attention weights with the original ATS code's masked softmax, as pure functions.

Once a token mask exists (after the first ATS block), every attention uses the masked softmax of the
reference implementation (`../shared/ATS_SPEC.md`, "Masked attention"): a masked key is still
visible to its own query, and `eps` keeps rows of padded queries finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SOFTMAX_EPS = 1e-6


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Softmax(q k^T / sqrt(d)) per head: q, k [B, N, H, d], mask [B, N] -> [B, H, N, N] float32.

  With `mask` (even all ones) the reference's masked softmax, else the plain one.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * scale, k).astype(jnp.float32)  # [B, H, N, N]
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  return masked_softmax(logits, mask)


def masked_softmax(logits: jax.Array, mask: jax.Array, eps: float = SOFTMAX_EPS) -> jax.Array:
  """The reference's masked softmax: logits [B, H, N, N], mask [B, N] (1 = real key).

  Per image, as the original computes it for the image alone (batch size 1, where it cuts every
  tensor to the image's own tokens): padded keys neither shift the row max nor count in the
  `eps / N` term, N being the image's own token count. So padding, however long, changes nothing:
  the padded and the compacted execution and any batch give the same numbers.
  """
  n = logits.shape[-1]
  mask = mask.astype(jnp.float32)
  visible = mask[:, None, None, :] + (1.0 - mask[:, None, None, :]) * jnp.eye(n, dtype=jnp.float32)
  row_max = jnp.max(jnp.where(visible > 0, logits, -jnp.inf), axis=-1, keepdims=True)
  e = jnp.exp(logits - row_max) * visible
  own = jnp.sum(mask, axis=-1)[:, None, None, None]  # [B, 1, 1, 1] the image's token count
  return (e + eps / own) / (jnp.sum(e, axis=-1, keepdims=True) + eps)


def attend(weights: jax.Array, v: jax.Array) -> jax.Array:
  """Weighted values: weights [B, H, Q, N] and v [B, N, H, d] -> [B, Q, H*d] in v's dtype."""
  out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)
  return out.reshape(out.shape[0], out.shape[1], -1)


def apply_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Zeroes padded token rows x [B, N, C] where mask [B, N] is 0; a no-op without a mask."""
  return x if mask is None else x * mask[..., None].astype(x.dtype)
