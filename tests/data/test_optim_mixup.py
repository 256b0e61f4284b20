"""DeiT's optimiser settings and Mixup/CutMix targets, checked against hand-computed values."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ats_jax.data import mixup
from ats_jax.models import vit
from ats_jax.training import optim, train
from configs import default, digits_ats


def test_learning_rate_scales_with_batch_warms_up_and_decays_to_min_lr():
  config = default.get_config()
  config.batch_size, config.warmup_epochs = 1024, 2.0
  schedule = optim.learning_rate(config, total_steps=100, steps_per_epoch=10)
  assert float(schedule(0)) == pytest.approx(optim.WARMUP_LR, rel=1e-4)
  assert float(schedule(20)) == pytest.approx(5e-4 * 1024 / 512)  # peak after 2 epochs
  assert float(schedule(100)) == pytest.approx(config.min_lr, rel=1e-4)
  assert float(schedule(10)) == pytest.approx((optim.WARMUP_LR + 1e-3) / 2)


def test_a_peak_learning_rate_below_min_lr_is_said_once_with_what_to_set(monkeypatch):
  """The README's fine-tuning base_lr 5e-5 at a global batch of 64: the peak 6.25e-6 is under
  min_lr 1e-5, so the "decay" rises (as DeiT's recipe does); the user is told, once."""
  warnings = []
  monkeypatch.setattr(optim.logging, 'warning', lambda *args: warnings.append(args[0] % args[1:]))
  config = default.get_config()
  config.base_lr, config.batch_size = 5e-5, 64
  schedule = optim.learning_rate(config, total_steps=100, steps_per_epoch=10)
  assert float(schedule(99)) > float(schedule(50))  # what the warning is about
  assert len(warnings) == 1 and '6.25e-06 is below min_lr 1e-05' in warnings[0]
  assert '--config.min_lr below 6.25e-06, e.g. 6.25e-07' in warnings[0]
  config.batch_size = 1024  # the peak 1e-4 is above min_lr: nothing to say
  optim.learning_rate(config, total_steps=100, steps_per_epoch=10)
  assert len(warnings) == 1


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


@pytest.mark.parametrize('num_groups', [1, 2])
@pytest.mark.parametrize('mode', ['mixup', 'cutmix'])
def test_mixed_targets_weigh_the_labels_as_the_pixels_do(mode, num_groups):
  """Image i (pixels and label i) mixed with its group's mirror image: the target weighs each of
  the two labels as the pixels do. Two groups: as two processes' shares, each mixed in itself."""
  b, size = 8, 16
  partner = {1: np.arange(b)[::-1], 2: np.array([3, 2, 1, 0, 7, 6, 5, 4])}[num_groups]
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
      jax.random.key(seed), images, jnp.arange(b), b, smoothing=0.0, num_groups=num_groups, **alphas
    )
    out, targets = np.asarray(out), np.asarray(targets)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    others = np.ones_like(targets, bool)
    others[np.arange(b), np.arange(b)] = others[np.arange(b), partner] = False
    assert not targets[others].any()  # only image i's and its partner's labels
    # mean pixel = the labels weighted by the target (pixel value = label)
    np.testing.assert_allclose(out.mean((1, 2, 3)), targets @ np.arange(b), atol=1e-5)
    if mode == 'cutmix':
      for i in range(b):
        assert set(np.unique(out[i])) <= {float(i), float(partner[i])}  # pasted, not blended


def test_partners_reverse_each_group():
  x = jnp.arange(6)
  np.testing.assert_array_equal(mixup.partners(x, 1), [5, 4, 3, 2, 1, 0])
  np.testing.assert_array_equal(mixup.partners(x, 3), [1, 0, 3, 2, 5, 4])
  with pytest.raises(ValueError, match='a batch of 6 does not split into 4 equal groups'):
    mixup.partners(x, 4)


def test_train_step_mixes_within_each_process(monkeypatch):
  """train_step groups the global batch by process: jax.process_count() contiguous shares."""
  config = digits_ats.get_config()
  config.model_overrides.update(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2)
  config.ats_blocks, config.aug.mixup = (), 0.8
  graphdef, params = nnx.split(train.build_model(config, num_classes=10))
  schedule = optax.constant_schedule(1e-3)
  tx = optim.create_optimizer(config, schedule)
  state = train.create_train_state(params, tx, ema=False)
  batch = {  # the input pipeline's train batch: uint8 images, random erasing's boxes (none here)
    'image': jnp.zeros((4, 8, 8, 3), jnp.uint8),
    'label': jnp.zeros((4,), jnp.int32),
    'erase': jnp.zeros((4, 4), jnp.int32),
  }
  groups = []
  real_mix = mixup.mix
  monkeypatch.setattr(
    mixup, 'mix', lambda *a, **k: groups.append(k['num_groups']) or real_mix(*a, **k)
  )
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  step = functools.partial(
    train.train_step, graphdef=graphdef, tx=tx, schedule=schedule, config=config, num_classes=10
  )
  jax.eval_shape(step, state, batch)
  assert groups == [2]
