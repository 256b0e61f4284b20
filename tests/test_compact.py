"""Compacted execution gives the padded mode's predictions, in one compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ats_jax.models import compact
from ats_jax.models import vit as vit_lib
from tests.test_ats import TINY, perturb


def test_ladder_and_bucket_choice_at_the_boundaries():
  assert compact.ladder(197, 16) == [16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 197]
  assert compact.ladder(32, 16) == [16, 32]  # the full count is not repeated
  sizes = compact.ladder(197, 16)
  masks = {1: 16, 16: 16, 17: 32, 192: 192, 193: 197, 197: 197}
  for needed, size in masks.items():
    mask = jnp.zeros((3, 197)).at[1, :needed].set(1.0).at[0, : needed // 2].set(1.0)
    index = int(compact.bucket_index(sizes, mask))
    assert sizes[index] == size == sizes[compact.bucket(sizes, needed)], needed


def pair(**kwargs):
  """The same weights in padded (bucket_size=0) and compacted (bucket_size=4) execution."""
  models = []
  for bucket_size in (0, 4):
    model = vit_lib.VisionTransformer(**TINY | kwargs, bucket_size=bucket_size, rngs=nnx.Rngs(0))
    model.eval()
    perturb(model, scale=0.5)
    models.append(model)
  return models


@pytest.mark.parametrize('ats', [dict(ats_blocks=(1, 2, 3), num_tokens=17),
                                 dict(ats_blocks=(1, 2), num_tokens=(12, 0.7))],
                         ids=['every_block_after_1', 'then_a_plain_block'])  # fmt: skip
def test_compacted_equals_padded_on_many_batches_with_one_compilation(ats):
  padded, compacted = pair(**ats)
  traces = []

  @nnx.jit
  def forward(model, images):
    traces.append(model.bucket_size)
    return model(images, return_stats=True)

  sizes_used = set()
  for seed in range(12):
    batch = 1 + seed % 4  # 1..4 images: the fullest image decides the bucket
    images = jax.random.normal(jax.random.key(seed), (batch, 32, 32, 3)) * (1 + seed % 3)
    (a, sa), (b, sb) = forward(padded, images), forward(compacted, images)
    np.testing.assert_array_equal(np.asarray(sb['kept_tokens']), np.asarray(sa['kept_tokens']))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sb['gflops']), np.asarray(sa['gflops']), rtol=1e-6)
    sizes_used.add(int(np.asarray(sa['kept_tokens'])[:, -1].max()))
  assert len(sizes_used) > 1  # batches that need different buckets
  assert traces.count(4) == 4  # one compilation per batch size (1..4), whatever was kept


def test_each_block_after_the_first_ats_block_is_one_switch_over_its_ladder():
  """The program holds a `case` per compacted block (XLA runs one branch), none before."""
  _, compacted = pair(ats_blocks=(1,), num_tokens=8)  # blocks 2 and 3 run on 4 or 8 slots
  hlo = nnx.jit(lambda m, x: m(x)).lower(compacted, jnp.zeros((2, 32, 32, 3))).as_text()
  assert hlo.count('stablehlo.case') == 2
