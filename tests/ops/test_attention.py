"""Attention with and without the reference's mask against float64 NumPy, and its backend choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ats_jax import backend
from ats_jax.ops import attention
from tests import ats_reference


def _qkv(dtype=jnp.float32, scale: float = 4.0):
  """q, k, v [B, H, N, d] with peaked attention (q scaled), as trained ViTs have."""
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 3, 197, 64))
  return (q * scale).astype(dtype), k.astype(dtype), v.astype(dtype)


def _float64_attention(q, k, v, mask=None) -> np.ndarray:
  """softmax(q k^T / sqrt(d)) v in float64 NumPy, per image with the reference's masked softmax
  (`tests/ats_reference.py`) when `mask` [B, N] is given: [B, N, H*d]."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum('bhqd,bhkd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if mask is None:
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
  else:
    pairs = zip(logits, mask, strict=True)
    weights = np.stack([ats_reference.masked_softmax(a, m) for a, m in pairs])
  out = np.einsum('bhqk,bhkd->bqhd', weights, v)
  return out.reshape(*out.shape[:2], -1)


def test_fused_attention_equals_float64():
  q, k, v = _qkv()
  fused = jax.jit(attention.fused_attention)(q, k, v)
  assert fused.shape == (2, 197, 3 * 64)
  np.testing.assert_allclose(fused, _float64_attention(q, k, v), atol=1e-5, rtol=0)


def _padded_keys():
  """q, k, v and a mask [2, 197]: the second image has 60 real keys, its padded ones hold 1e4."""
  q, k, v = _qkv()
  mask = (np.arange(197)[None] < np.asarray([[197], [60]])).astype(np.float32)
  return q, k.at[1, :, 60:].set(1e4), v.at[1, :, 60:].set(1e4), mask


def test_masked_attention_equals_float64_whatever_the_padded_keys_hold():
  q, k, v, mask = _padded_keys()
  got = jax.jit(attention.softmax_attention)(q, k, v, jnp.asarray(mask))
  np.testing.assert_allclose(got, _float64_attention(q, k, v, mask), atol=1e-5, rtol=0)


def test_masked_fused_attention_gives_cudnn_each_images_key_count(monkeypatch):
  """On a GPU in 16-bit floats the masked attention goes to cuDNN with the images' key counts.
  This CPU has no cuDNN: JAX's own XLA attention, given the same arguments, stands in for it, and
  must match the reference's masked softmax in float64 but for its eps terms (1e-6 relative)."""
  monkeypatch.setattr(backend, 'attention_implementation', lambda dtype: 'cudnn')
  calls = []
  xla = jax.nn.dot_product_attention

  def stand_in(*args, key_value_seq_lengths, implementation):
    calls.append((np.asarray(key_value_seq_lengths), implementation))
    return xla(*args, key_value_seq_lengths=key_value_seq_lengths, implementation='xla')

  monkeypatch.setattr(jax.nn, 'dot_product_attention', stand_in)
  q, k, v, mask = _padded_keys()
  got = attention.fused_attention(q, k, v, jnp.asarray(mask))
  (lengths, implementation), *more = calls
  assert not more and implementation == 'cudnn' and lengths.tolist() == [197, 60]
  assert lengths.dtype == np.int32
  np.testing.assert_allclose(got, _float64_attention(q, k, v, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
  'platform, dtype, expected',
  [
    ('gpu', jnp.bfloat16, 'cudnn'),
    ('gpu', jnp.float16, 'cudnn'),
    ('gpu', jnp.float32, None),  # cuDNN's fused kernel has no float32
    ('tpu', jnp.bfloat16, None),
    ('cpu', jnp.bfloat16, None),
  ],
)
def test_cudnn_only_on_gpus_in_16_bit_floats(monkeypatch, platform, dtype, expected):
  monkeypatch.setattr(jax, 'default_backend', lambda: platform)
  assert backend.attention_implementation(dtype) == expected


def test_where_cudnn_is_refused_xla_computes_the_same(monkeypatch):
  """On this CPU, asking for cuDNN raises 'cuDNN is not detected', as a GPU cuDNN refuses would."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  q, k, v = _qkv(jnp.bfloat16)
  with pytest.raises(RuntimeError):
    jax.nn.dot_product_attention(
      *(t.transpose(0, 2, 1, 3) for t in (q, k, v)), implementation='cudnn'
    )
  fused = attention.fused_attention(q, k, v)
  assert fused.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(fused, np.float32), _float64_attention(q, k, v), atol=3e-2, rtol=0
  )
  mask = (np.arange(197)[None] < np.asarray([[197], [60]])).astype(np.float32)
  masked = attention.fused_attention(q, k, v, jnp.asarray(mask))  # the reference's eps terms too
  expected = attention.softmax_attention(q, k, v, jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(masked, np.float32), np.asarray(expected, np.float32))
