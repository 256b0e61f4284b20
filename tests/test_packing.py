"""Packed execution gives padded execution's tokens, logits and gradients, compiled once."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ats_jax.models import create_model
from ats_jax.models import vit as vit_lib
from ats_jax.ops import packing
from experiments.photos import photos
from tests.test_ats import TINY, perturb

ATS = dict(ats_blocks=(1, 2, 3), num_tokens=(0.9, 12, 10))


def test_ladder_is_geometric_from_a_quarter_and_ends_at_the_total():
  assert packing.ladder(197, 8) == (50, 61, 74, 90, 109, 133, 162, 197)
  assert packing.ladder(197, 1) == (197,)
  assert packing.ladder(5, 8) == (2, 3, 4, 5)  # sizes never repeat
  sizes = packing.ladder(197, 8)
  for needed, size in {1: 50, 50: 50, 51: 61, 196: 197, 197: 197}.items():
    mask = jnp.zeros((1, 197), bool).at[0, :needed].set(True)
    assert sizes[int(packing.size_index(sizes, mask))] == size


def test_pack_indices_round_trip():
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], bool)
  gather, scatter = packing.pack_indices(mask, 8)
  assert np.asarray(gather)[:6].tolist() == [0, 1, 2, 4, 8, 9]  # real slots, image after image
  x = jnp.arange(12).reshape(3, 4)
  back = np.asarray(x.reshape(-1)[gather][scatter] * mask)
  np.testing.assert_array_equal(back, np.asarray(x * mask))


def pair(**kwargs):
  """The same (large) weights in padded and packed execution, with small ladders."""
  models = []
  for execution in ('padded', 'packed'):
    model = vit_lib.VisionTransformer(
      **TINY | ATS | kwargs, execution=execution, pack_sizes=3, attention_sizes=3,
      rngs=nnx.Rngs(0),
    )  # fmt: skip
    model.eval()
    perturb(model, scale=0.5)
    models.append(model)
  return models


def test_packed_equals_padded_on_real_photos_at_batch_1_to_16_with_one_compilation_each():
  padded, packed = pair()
  traces = []

  @nnx.jit
  def forward(model, images):
    traces.append(model.execution)
    return model(images, return_stats=True)

  images = jnp.asarray(photos(28, size=32))
  used = set()
  for batch in (1, 4, 16):  # 16: attention sized per group of 8 images (sorted, then restored)
    for start in (0, 12):
      x = images[start : start + batch]
      (a, sa), (b, sb) = forward(padded, x), forward(packed, x)
      np.testing.assert_array_equal(np.asarray(sb['kept_tokens']), np.asarray(sa['kept_tokens']))
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
      used.add(int(np.asarray(sa['kept_tokens'])[:, 1:].sum()) * 10 // (batch * 17 * 3))
  assert len(used) > 1  # batches that fill different sizes of the ladders
  assert traces.count('packed') == 3  # one compilation per batch size, whatever was kept


def count_switches(jaxpr) -> int:
  """`cond` equations in a jaxpr and every jaxpr inside it."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == 'cond'
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += count_switches(sub)
  return count


def test_each_masked_section_is_one_switch():
  """Per block after the first ATS block: one switch for each per-token section, one for
  attention; none before it, none in padded execution."""
  padded, packed = pair(ats_blocks=(1,), num_tokens=12)
  images = jnp.zeros((2, 32, 32, 3))
  count = {}
  for model in (padded, packed):
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x, g=graphdef: nnx.merge(g, s)(x))(state, images)
    count[model.execution] = count_switches(jaxpr.jaxpr)
  assert count == {'padded': 0, 'packed': 1 + 2 * 3}  # block 1: residuals; blocks 2, 3: all three


def loss_fn(model, images, labels, rng=None):
  logits = model(images, rng=rng)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_gradients_equal_padded_mode():
  padded, packed = pair()
  images = jnp.asarray(photos(16, size=32))  # two attention groups
  labels = jnp.arange(16) % 10
  grad = nnx.jit(nnx.value_and_grad(loss_fn))
  (la, ga), (lb, gb) = grad(padded, images, labels), grad(packed, images, labels)
  np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)
  flat_a, flat_b = vit_lib.param_dict(ga), vit_lib.param_dict(gb)
  for name, g in flat_a.items():
    np.testing.assert_allclose(np.asarray(flat_b[name][...]), np.asarray(g[...]), atol=1e-5,
                               rtol=1e-4, err_msg=name)  # fmt: skip
  assert np.abs(np.asarray(flat_b['blocks.3.mlp.fc1.kernel'][...])).max() > 0


def test_drop_path_is_per_image_deterministic_and_the_same_in_both_executions():
  padded, packed = pair(drop_path_rate=0.5)
  images = jnp.asarray(photos(8, size=32))
  labels = jnp.arange(8) % 10
  loss = nnx.jit(loss_fn)
  key, other = jax.random.key(3), jax.random.key(4)
  a, b = float(loss(padded, images, labels, key)), float(loss(packed, images, labels, key))
  assert a == pytest.approx(b, rel=1e-6)
  assert float(loss(packed, images, labels, key)) == b  # a function of the key alone
  assert float(loss(packed, images, labels, other)) != pytest.approx(b, rel=1e-4)
  eval_loss = float(loss(packed, images, labels))  # no rng: nothing dropped
  no_drop = pair()[1]
  assert eval_loss == pytest.approx(float(loss(no_drop, images, labels)), rel=1e-6)
  scales = np.asarray(packed.drop_scales(key, 8)[3])  # last block: rate 0.5
  assert set(np.unique(scales).tolist()) <= {0.0, 2.0} and 0 < scales.mean() < 2
  assert packed.drop_scales(key, 8)[0] is None  # timm's rule: the first block never drops


def test_huge_values_in_padded_slots_leave_logits_finite_and_unchanged():
  """Whatever padded slots hold (a padded key's logit far above the row max, inf, NaN), it never
  reaches a real token: no `exp` overflow to inf * 0, no NaN."""
  padded, packed = pair()
  images = jnp.asarray(photos(4, size=32))

  @nnx.jit
  def tail(model, images, fill):
    x, mask = model.blocks[0](model.embed(images))
    x, mask = model.blocks[1](x, mask)
    x = jnp.where(mask[..., None] > 0, x, fill)  # only padded slots
    for block in model.blocks[2:]:
      x, mask = block(x, mask, pack_sizes=model.pack_sizes, attention_sizes=model.attention_sizes)
    return model.head_logits(x), mask

  for model in (padded, packed):
    clean, mask = tail(model, images, 0.0)
    assert (np.asarray(mask) == 0).any()
    for fill in (1e30, -1e30, np.inf, np.nan):
      dirty, _ = tail(model, images, fill)
      np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))


def test_deit_s_training_step_memory_in_packed_execution_at_most_padded():
  """XLA's memory analysis of one DeiT-S training step at batch 16: packed <= 1.15x padded."""
  temp = {}
  for execution in ('padded', 'packed'):
    model = nnx.eval_shape(
      lambda e=execution: create_model(
        'deit_small_patch16_224', ats_blocks=tuple(range(3, 12)), execution=e
      )
    )
    graphdef, params = nnx.split(model)

    def step(params, images, labels, graphdef=graphdef):
      return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), images, labels))(params)

    images = jax.ShapeDtypeStruct((16, 224, 224, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((16,), jnp.int32)
    compiled = jax.jit(step).lower(params, images, labels).compile()
    temp[execution] = compiled.memory_analysis().temp_size_in_bytes
  assert temp['packed'] <= 1.15 * temp['padded'], temp


def test_auto_execution_is_packed_on_cpu_and_padded_on_gpu(monkeypatch):
  assert vit_lib.VisionTransformer(**TINY, rngs=nnx.Rngs(0)).execution == 'packed'  # this CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  model = vit_lib.VisionTransformer(**TINY, rngs=nnx.Rngs(0))
  assert (model.execution, model.pack_sizes, model.attention_sizes) == ('padded', 0, 0)
  with pytest.raises(ValueError, match='execution must be one of'):
    vit_lib.VisionTransformer(**TINY, execution='compacted', rngs=nnx.Rngs(0))
