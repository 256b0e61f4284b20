"""Every choice that depends on the backend, in one place: what `'auto'` means where.

XLA:GPU runs each `while` step and `conditional` as a host round-trip (`docs/accelerators.md`);
CPUs and TPUs do not pay that way, and only GPUs have cuDNN's fused attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACCELERATORS = ('gpu', 'tpu')
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's fused attention: 16-bit floats only


def platform() -> str:
  """The default backend's platform: 'cpu', 'gpu' or 'tpu'."""
  return jax.default_backend()


def execution_mode() -> str:
  """`execution='auto'`: budgeted on accelerators (no host round-trips); packed on CPUs, where
  loop steps are free and its cost follows the tokens most closely."""
  return 'budgeted' if platform() in ACCELERATORS else 'packed'


def search_method(mode: str) -> str:
  """`jnp.searchsorted`'s method: unrolled on GPUs and in budgeted execution (no loops), a `while`
  loop elsewhere, which compiles faster."""
  return 'scan_unrolled' if mode == 'budgeted' or platform() == 'gpu' else 'scan'


def attention_implementation(dtype: jnp.dtype) -> str | None:
  """`jax.nn.dot_product_attention`'s backend: 'cudnn' (fused, flash-style) on GPUs in 16-bit
  floats, None (XLA's softmax(q k^T) v) elsewhere: JAX picks XLA for None, even on GPUs."""
  return 'cudnn' if platform() == 'gpu' and dtype in CUDNN_DTYPES else None


def compute_dtype(name: str) -> jnp.dtype:
  """`config.dtype`: 'auto' is bfloat16 on GPU/TPU and float32 on CPU; else the named dtype.

  Only the computation: parameters, logits and ATS scores stay float32 (the model keeps them so).
  """
  if name == 'auto':
    return jnp.dtype(jnp.bfloat16 if platform() in ACCELERATORS else jnp.float32)
  return jnp.dtype(name)
