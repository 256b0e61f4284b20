"""DeiT's optimiser settings and Mixup/CutMix targets, checked against hand-computed values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ats_jax import mixup, optim
from ats_jax.models import vit
from configs import default


def test_learning_rate_scales_with_batch_warms_up_and_decays_to_min_lr():
  config = default.get_config()
  config.batch_size, config.warmup_epochs = 1024, 2.0
  schedule = optim.learning_rate(config, total_steps=100, steps_per_epoch=10)
  assert float(schedule(0)) == pytest.approx(optim.WARMUP_LR, rel=1e-4)
  assert float(schedule(20)) == pytest.approx(5e-4 * 1024 / 512)  # peak after 2 epochs
  assert float(schedule(100)) == pytest.approx(config.min_lr, rel=1e-4)
  assert float(schedule(10)) == pytest.approx((optim.WARMUP_LR + 1e-3) / 2)


def test_weight_decay_skips_norms_biases_tokens_and_pos_embed():
  model = vit.VisionTransformer(
    img_size=16,
    patch_size=8,
    embed_dim=8,
    depth=1,
    num_heads=2,
    num_classes=3,
    distilled=True,
    rngs=nnx.Rngs(0),
  )
  mask = optim.decay_mask(nnx.state(model))
  decayed = {'.'.join(map(str, k)) for k, v in nnx.to_flat_state(mask) if v.get_value()}
  assert decayed == {
    'patch_embed.proj.kernel',
    'blocks.0.attn.qkv.kernel',
    'blocks.0.attn.proj.kernel',
    'blocks.0.mlp.fc1.kernel',
    'blocks.0.mlp.fc2.kernel',
    'head.kernel',
    'head_dist.kernel',
  }


def test_targets_without_mixing_are_smoothed_one_hot():
  images = jnp.ones((3, 4, 4, 3))
  out, targets = mixup.mix(
    jax.random.key(0),
    images,
    jnp.array([0, 2, 1]),
    4,
    mixup_alpha=0.0,
    cutmix_alpha=0.0,
    smoothing=0.1,
  )
  assert out is images
  np.testing.assert_allclose(targets[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)


@pytest.mark.parametrize('mode', ['mixup', 'cutmix'])
def test_mixed_targets_weigh_the_labels_as_the_pixels_do(mode):
  """Image i mixed with image B-1-i: its target weight on label i is the share of its pixels."""
  b, size = 4, 16
  images = jnp.broadcast_to(
    jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, size, size, 3)
  )
  alphas = (
    dict(mixup_alpha=0.8, cutmix_alpha=0.0)
    if mode == 'mixup'
    else dict(mixup_alpha=0.0, cutmix_alpha=1.0)
  )
  for seed in range(5):
    out, targets = mixup.mix(
      jax.random.key(seed), images, jnp.arange(b), b, smoothing=0.0, **alphas
    )
    out, targets = np.asarray(out), np.asarray(targets)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    # image 0 (value 0) mixed with image 3 (value 3): mean pixel = 3 * weight of label 3
    np.testing.assert_allclose(out[0].mean() / 3, targets[0, 3], atol=1e-5)
    if mode == 'cutmix':
      assert set(np.unique(out[0])) <= {0.0, 3.0}  # pasted, not blended
