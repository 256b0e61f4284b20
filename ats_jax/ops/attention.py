"""Attention with the original ATS code's masked softmax, as pure functions.

Heads come before tokens ([B, H, N, d]), the layout in which XLA runs both products without
transposes. Logits are float32 whatever the computation dtype (`preferred_element_type`): ATS ranks
tokens by them, and bfloat16's 8-bit mantissa would reorder close scores.

Once a token mask exists (after the first ATS block), every attention uses the masked softmax of the
reference implementation (`docs/ats_spec.md`, "Masked attention"), per image. Attention needs
no weights, only their product with v (ATS scores its tokens with the cls row alone: `cls_logits`,
`masked_softmax`): `fused_attention` hands it to cuDNN's fused kernel on GPUs in 16-bit floats
(`jax.nn.dot_product_attention`), to `softmax_attention` elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from ats_jax import backend

SOFTMAX_EPS = 1e-6


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """q [B, H, Q, d], k [B, H, N, d] -> q k^T / sqrt(d) [B, H, Q, N] in float32."""
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  return jnp.einsum('bhqd,bhkd->bhqk', q * scale, k, preferred_element_type=jnp.float32)


def cls_logits(query: jax.Array, k: jax.Array) -> jax.Array:
  """Each token's logit against its image's cls query, per head: query [..., H, d] (the cls
  token's q, already scaled by 1 / sqrt(d)), k [..., H*d] -> [..., H] float32.

  Per token, so it runs with the per-token work, while k is in cache (`vit._qkv`): read again
  afterwards, k and v cost sampling a measurable share of the forward (`docs/execution.md`). A
  product and a sum per head, as a matrix product would first copy k into heads-first layout.
  """
  products = k.reshape(query.shape).astype(jnp.float32) * query.astype(jnp.float32)
  return jnp.sum(products, axis=-1)


def _shifted_exp(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  """exp(logits - row max) [B, H, Q, N]: with mask [B, N], 0 at padded keys, which take no part
  in the max and never reach `exp` (a huge logit there cannot overflow to `inf * 0`)."""
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :] > 0, logits, -jnp.inf)
  return jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))


def _own_tokens(mask: jax.Array) -> jax.Array:
  """Each image's own token count, the N of the reference's `eps / N`: [B, N] -> [B, 1, 1, 1]."""
  return jnp.sum(mask.astype(jnp.float32), axis=-1)[:, None, None, None]


def masked_softmax(logits: jax.Array, mask: jax.Array, eps: float = SOFTMAX_EPS) -> jax.Array:
  """The reference's masked softmax: logits [B, H, Q, N], mask [B, N] (1 = real key).

  Per image, as the original computes it for the image alone (batch size 1, where it cuts every
  tensor to the image's own tokens, so no query sees a padded key): padded keys weigh exactly 0,
  take no part in the row max or the `eps / N` term (N: the image's own token count), and never
  reach `exp`, so a huge logit in a padded slot cannot overflow to `inf * 0`. Padding, however long
  and whatever it holds, changes nothing: every execution and every batch give the same numbers.
  Rows of padded queries are finite (they see the real keys) and are masked by the caller.
  """
  e = _shifted_exp(logits, mask)  # [B, H, Q, N]; 0 where padded
  real = mask[:, None, None, :] > 0  # [B, 1, 1, N]
  total = jnp.sum(e, axis=-1, keepdims=True) + eps
  return jnp.where(real, e + eps / _own_tokens(mask), 0.0) / total


def softmax_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, eps: float = SOFTMAX_EPS
) -> jax.Array:
  """Softmax(q k^T / sqrt(d)) v: q [B, H, Q, d], k, v [B, H, N, d] -> [B, Q, H*d] in v's dtype.

  With `mask` [B, N] (even all ones) the reference's masked softmax (`masked_softmax`), else the
  plain one. The weights are normalised after their product with v, one division per output
  element instead of one per weight, and the product is taken heads first, then laid out tokens
  first: on the CPU much faster than normalising the [B, H, Q, N] weights and writing tokens first
  (figures in `docs/execution.md`).

  Padded keys get -inf added to their logits, not selected in: XLA on CPU fuses the logits'
  product with a bias into what follows, but writes the logits out before a select
  (`docs/execution.md`). Their k and v are zeroed first, so their
  logits are 0 + -inf whatever the slots held (inf + -inf would be NaN).
  """
  if mask is not None:
    k, v = (jnp.where(mask[:, None, :, None] > 0, t, 0) for t in (k, v))
  logits = attention_logits(q, k)  # [B, H, Q, N] float32
  if mask is not None:
    logits = logits + jnp.where(mask > 0, 0.0, -jnp.inf)[:, None, None, :]
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # 0 at padded keys
  out = jnp.einsum('bhqk,bhkd->bhqd', e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  total = jnp.sum(e, axis=-1, keepdims=True)  # [B, H, Q, 1]
  if mask is not None:  # each real key's eps / N, N the image's own token count (`masked_softmax`)
    real_v = jnp.einsum('bk,bhkd->bhd', mask.astype(jnp.float32), v,
                        preferred_element_type=jnp.float32)  # fmt: skip
    out = out + eps / _own_tokens(mask) * real_v[:, :, None]
    total = total + eps
  out = (out / total).astype(v.dtype).transpose(0, 2, 1, 3)  # [B, Q, H, d]
  return out.reshape(*out.shape[:2], -1)


def fused_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v, no weights kept: q [B, H, Q, d], k, v [B, H, N, d] -> [B, Q, H*d].

  cuDNN's fused kernel through `jax.nn.dot_product_attention` on GPUs in 16-bit floats (it takes
  tokens before heads); elsewhere, or where cuDNN refuses the shapes or the GPU (its checks run
  while tracing), `softmax_attention`. With `mask` [B, N] (real keys first, as every token layout
  here has them) cuDNN gets each image's key count: the reference's masked softmax without its
  `eps` terms, a relative 1e-6 (the row sum of exp is at least 1), far below 16-bit resolution
  (bfloat16: 2^-8), and a fifth of the memory traffic of float32 weights written out.
  """
  if backend.attention_implementation(q.dtype) is None:
    return softmax_attention(q, k, v, mask)
  lengths = None if mask is None else jnp.sum(mask > 0, axis=-1, dtype=jnp.int32)
  try:
    out = jax.nn.dot_product_attention(
      *(t.transpose(0, 2, 1, 3) for t in (q, k, v)),
      key_value_seq_lengths=lengths,
      implementation='cudnn',
    )  # [B, Q, H, d]
  except (NotImplementedError, RuntimeError, ValueError) as error:
    logging.warning('cuDNN attention unavailable (%s): XLA computes it', error)
    return softmax_attention(q, k, v, mask)
  return out.reshape(*out.shape[:2], -1)
