"""JAX ViT `.npz` checkpoints (vision_transformer and big_vision naming) convert to the logits timm
gives after its own `_load_weights` of the same file."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import timm
from flax import nnx
from timm.models.vision_transformer import _load_weights

import convert.__main__ as convert_cli
from ats_jax.models import create_model, registry
from tests.references import NPZ_NAME, timm_logits, write_npz


@pytest.mark.parametrize(
  'scheme,prefix',
  [('vision_transformer', ''), ('vision_transformer', 'opt/target/'), ('big_vision', 'params/')],
)
def test_npz_matches_timms_load_weights(tmp_path, images, capsys, scheme, prefix):
  src = write_npz(tmp_path, scheme, prefix)
  # big_vision adds positions before prepending cls: timm models that as no_embed_class.
  reference = timm.create_model(NPZ_NAME, pretrained=False, no_embed_class=scheme == 'big_vision')
  _load_weights(reference.eval(), str(src))
  out = tmp_path / 'converted'
  assert convert_cli.main([str(src), str(out)]) == 0  # .npz is AugReg/original ViT: vit_* inferred
  meta = json.loads((out / 'ats_jax.json').read_text())
  assert meta['model'] == NPZ_NAME
  assert meta['data'] == registry.VIT_DATA_224.to_json()
  assert meta['data']['mean'] == [0.5, 0.5, 0.5] and meta['data']['crop_pct'] == 0.9
  assert 'preprocess  mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5), crop_pct 0.9, bicubic' in (
    capsys.readouterr().out
  )

  x = images(batch=2)
  model = create_model(NPZ_NAME, checkpoint=out)
  model.eval()
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
  expected = timm_logits(reference, x)
  print(f'{scheme} {prefix!r}: max |logit diff| {np.abs(got - expected).max():.2e}')
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  assert np.abs(expected).max() > 0.5


@pytest.mark.parametrize(
  'drop,add,message',
  [
    (('cls',), None, 'pools by GAP'),
    ((), {'params/MAPHead_0/probe': np.zeros((1, 1, 192))}, 'pools by a MAP head'),
    ((), {'params/pre_logits/kernel': np.zeros((192, 192))}, 'pre_logits'),
    (('head/kernel', 'head/bias'), None, 'no classification head'),
    ((), {'params/Transformer/extra/scale': np.zeros(3)}, 'no ViT layer uses'),
  ],
)
def test_npz_that_cannot_serve_ats_ends_with_one_error_line(tmp_path, capsys, drop, add, message):
  src = write_npz(tmp_path, 'big_vision', 'params/', drop=drop, add=add)
  assert convert_cli.main([str(src), str(tmp_path / 'out')]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
  assert not (tmp_path / 'out').exists()
