"""`ats_jax.enable_ats` / `disable_ats` on a model you already have."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import ats_jax
from ats_jax.models import vit as vit_lib
from tests.helpers import TINY, forward, perturb


def tiny(**overrides) -> vit_lib.VisionTransformer:
  model = vit_lib.VisionTransformer(**TINY | overrides, rngs=nnx.Rngs(0))
  perturb(model)  # sharp attention: ATS really drops tokens
  model.eval()
  return model


def params(model) -> dict[str, np.ndarray]:
  return {k: np.array(v[...]) for k, v in vit_lib.param_dict(model).items()}


@pytest.mark.parametrize('execution', ['padded', 'packed'])
def test_enable_equals_a_created_ats_model_and_disable_gives_dense_bit_for_bit(execution):
  images = np.random.default_rng(0).standard_normal((6, 32, 32, 3)).astype(np.float32)
  jitted = nnx.jit(forward)
  model = tiny(execution=execution)
  before = params(model)
  dense_logits, _ = jax.device_get(jitted(model, images))

  assert ats_jax.enable_ats(model, blocks=(1, 2), num_tokens=(12, 0.7)) is model
  assert ats_jax.ats_blocks(model) == (1, 2)
  logits, stats = jax.device_get(jitted(model, images))
  created = tiny(execution=execution, ats_blocks=(1, 2), num_tokens=(12, 0.7))
  want_logits, want_stats = jax.device_get(jitted(created, images))
  np.testing.assert_array_equal(logits, want_logits)
  np.testing.assert_array_equal(stats['kept_tokens'], want_stats['kept_tokens'])
  assert stats['kept_tokens'][:, 1].max() <= 12 and stats['kept_tokens'][:, 1].min() < 12
  assert [b.sampling for b in model.blocks] == [b.sampling for b in created.blocks]

  ats_jax.disable_ats(model)
  assert ats_jax.ats_blocks(model) == ()
  off_logits, off_stats = jax.device_get(jitted(model, images))
  np.testing.assert_array_equal(off_logits, dense_logits)  # bit for bit
  assert (off_stats['kept_tokens'] == 17).all()
  after = params(model)
  assert after.keys() == before.keys()
  for key, value in before.items():
    np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_enable_checks_its_arguments():
  model = tiny()
  with pytest.raises(ValueError, match='distinct block indices'):
    ats_jax.enable_ats(model, blocks=(4,))
  with pytest.raises(ValueError, match='one per ATS block'):
    ats_jax.enable_ats(model, blocks=(1, 2), num_tokens=(10, 9, 8))
  assert ats_jax.ats_blocks(model) == ()  # a refused setting changes nothing
