"""bfloat16 at DeiT-S scale on real photos: ATS keeps float32's tokens and predictions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ats_jax.models import create_model
from experiments.photos import photos
from experiments.token_stats import sharpen_attention
from tests.helpers import forward

NAME, ATS_BLOCKS, IMAGES = 'deit_small_patch16_224', tuple(range(3, 12)), 48
# Padded execution: budgeted and packed keep padded's tokens and logits (tests/layout/) and
# compile longer on this CPU.
EXECUTION = 'padded'


@nnx.jit
def features(model, images):
  """Pre-head features: the final norm of the cls token [B, C]."""
  x, mask = model.embed(images), None
  for block in model.blocks:
    x, mask, _ = block(x, mask)
  return model.norm(x)[:, 0]


def test_bfloat16_deit_s_keeps_float32_tokens_and_top1_on_real_photos():
  """Random weights with sharp attention (q, k x4); the head is a nearest-prototype classifier over
  the photos' own float32 features, so each photo has a decisive class as under trained weights
  (a random head's top-2 margins are below any rounding). Logits, scores and the residual stream
  stay float32; the layers compute in bfloat16."""
  images = jnp.asarray(photos(IMAGES))
  f32 = create_model(NAME, ats_blocks=ATS_BLOCKS, num_classes=IMAGES, execution=EXECUTION)
  sharpen_attention(f32, 4.0)
  prototypes = np.array(features(f32, images))
  prototypes /= np.linalg.norm(prototypes, axis=-1, keepdims=True)
  f32.head.kernel[...] = jnp.asarray(10 * prototypes.T)
  f32.head.bias[...] = jnp.zeros(IMAGES)
  bf16 = nnx.eval_shape(  # shape-only: every parameter comes from f32
    lambda: create_model(
      NAME, ats_blocks=ATS_BLOCKS, num_classes=IMAGES, execution=EXECUTION, dtype=jnp.bfloat16
    )
  )
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  assert bf16.dtype == jnp.bfloat16 and f32.execution.mode == bf16.execution.mode == 'padded'
  jitted = nnx.jit(forward)
  (a, sa), (b, sb) = jitted(f32, images), jitted(bf16, images)
  assert b.dtype == jnp.float32
  kept_a = np.asarray(sa['kept_tokens']).mean(0)
  kept_b = np.asarray(sb['kept_tokens']).mean(0)
  assert kept_a[-1] < 150  # sharp attention: ATS drops tokens
  # per block: the mean within 1.5%, each image within 3% on average (measured: 1.04% and 2.3% at
  # the last block, where differences have accumulated over 8 ATS blocks)
  np.testing.assert_allclose(kept_b, kept_a, rtol=0.015)
  per_image = np.abs(np.asarray(sb['kept_tokens']) - np.asarray(sa['kept_tokens'])).mean(0)
  assert (per_image <= 0.03 * kept_a).all(), per_image / kept_a
  top1_a, top1_b = np.asarray(a).argmax(-1), np.asarray(b).argmax(-1)
  assert (top1_a == np.arange(IMAGES)).mean() > 0.9  # the constructed classes are decisive
  assert (top1_b == top1_a).mean() >= 0.99
