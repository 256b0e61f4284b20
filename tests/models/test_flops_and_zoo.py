"""Cost and size figures against the literature and timm."""

from __future__ import annotations

import numpy as np
import pytest
import timm

from ats_jax.models import MODELS, flops, get_spec, zoo


@pytest.mark.parametrize(
  'name,expected',
  [
    ('deit_tiny_patch16_224', 1.3),
    ('deit_small_patch16_224', 4.6),
    ('deit_base_patch16_224', 17.6),
  ],
)
def test_dense_gflops_are_the_published_figures(name, expected):
  assert round(flops.dense_gflops(get_spec(name)), 1) == expected


def test_block_flops_by_hand():
  # dim 2, hidden 4, 3 keys, 2 queries: qkv 3*2*2*3, qk 2*3*3, Sv 2*2*3, proj 2*2*2, mlp 2*2*4*2
  assert flops.block_flops(3, 2, dim=2, mlp_ratio=2.0) == 36 + 18 + 12 + 8 + 32


def test_per_block_counts_at_full_tokens_equal_dense():
  spec = get_spec('deit_small_patch16_224')
  full = np.full((3, spec.depth), 197)
  np.testing.assert_allclose(flops.gflops(spec, full, full), flops.dense_gflops(spec), rtol=1e-6)


@pytest.mark.parametrize('name', list(MODELS))
def test_parameter_counts_equal_timm(name):
  reference = timm.create_model(name, pretrained=False)
  assert zoo.num_params(name) == sum(p.numel() for p in reference.parameters())
