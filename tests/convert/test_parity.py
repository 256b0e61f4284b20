"""Flax logits equal timm's on the same (random) weights, through the converter CLI."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from timm.models import deit as timm_deit

import convert.__main__ as convert_cli
from ats_jax.models import MODELS, create_model
from tests.helpers import flax_logits
from tests.references import random_timm_model, save_checkpoint, timm_logits

FORMATS = ('deit_pth', 'bare_pth', 'safetensors')


@pytest.mark.parametrize('name', [n for n in MODELS if n.startswith('deit_')])
def test_cli_conversion_matches_timm(name, tmp_path, images, capsys):
  fmt = FORMATS[list(MODELS).index(name) % len(FORMATS)]
  reference = random_timm_model(name)
  src = save_checkpoint(reference, tmp_path / 'src', fmt)
  out = tmp_path / 'converted'

  # Distilled variants are inferred; the others share their keys with vit_* and need --model.
  model_flag = [] if MODELS[name].distilled else ['--model', name]
  assert convert_cli.main([src, str(out), *model_flag]) == 0
  printed = capsys.readouterr().out
  assert json.loads((out / 'ats_jax.json').read_text())['model'] == name
  assert f'model       {name}' in printed

  x = images(size=MODELS[name].img_size)
  expected = timm_logits(reference, x)
  got = flax_logits(out, name, x)
  assert got.shape == expected.shape == (4, 1000)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  assert np.abs(expected).max() > 0.5  # the weights are not trivially near zero


def test_file_checkpoint_loads_on_the_fly(tmp_path, images):
  """`create_model(checkpoint=x.pth)` converts in memory and equals the converted directory."""
  reference = random_timm_model('deit_tiny_patch16_224', seed=1)
  src = save_checkpoint(reference, tmp_path / 'src', 'deit_pth')
  x = images(batch=2)
  np.testing.assert_allclose(
    flax_logits(src, 'deit_tiny_patch16_224', x), timm_logits(reference, x), rtol=0, atol=1e-4
  )


def test_pos_embed_resized_as_timm_does(tmp_path, images, capsys):
  """A 224 checkpoint converted for the 384 model gives the logits timm gives loading it at 384."""
  src_model = random_timm_model('deit_base_patch16_224', seed=2)
  src = save_checkpoint(src_model, tmp_path / 'src', 'deit_pth')
  out = tmp_path / 'converted'
  assert convert_cli.main([src, str(out), '--model', 'deit_base_patch16_384']) == 0
  assert 'pos_embed resized from 196 to 576 patches' in capsys.readouterr().out

  reference = random_timm_model('deit_base_patch16_384').eval()
  reference.load_state_dict(timm_deit.checkpoint_filter_fn(src_model.state_dict(), reference))
  x = images(batch=2, size=384)
  np.testing.assert_allclose(
    flax_logits(out, 'deit_base_patch16_384', x), timm_logits(reference, x), rtol=0, atol=1e-4
  )


def test_bfloat16_computation_keeps_float32_params(tmp_path, images):
  reference = random_timm_model('deit_tiny_patch16_224', seed=3)
  src = save_checkpoint(reference, tmp_path / 'src', 'safetensors')
  model = create_model('deit_tiny_patch16_224', checkpoint=src, dtype=jnp.bfloat16)
  model.eval()
  assert model.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32
  x = images(batch=2)
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
  expected = timm_logits(reference, x)
  assert got.dtype == np.float32
  # bfloat16 keeps ~3 significant digits: close, and the same predicted classes.
  np.testing.assert_allclose(got, expected, atol=0.15 * np.abs(expected).max())
  assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_converted_checkpoint_loads_unchanged_into_an_ats_model(tmp_path, images):
  """ATS adds no parameters: the dense checkpoint loads into it as it is."""
  reference = random_timm_model('deit_small_patch16_224', seed=5)
  src = save_checkpoint(reference, tmp_path / 'src', 'deit_pth')
  out = tmp_path / 'converted'
  assert convert_cli.main([src, str(out), '--model', 'deit_small_patch16_224']) == 0
  x = images(batch=2)
  model = create_model('deit_small_patch16_224', checkpoint=out, ats_blocks=range(3, 12))
  model.eval()
  logits, stats = nnx.jit(lambda m, x: m(x, return_stats=True))(model, jnp.asarray(x))
  kept = np.asarray(stats['kept_tokens'])
  assert (kept[:, :3] == 197).all() and (kept[:, 3:] < 197).all()
  assert (np.diff(kept, axis=1) <= 0).all()
  assert (np.asarray(stats['gflops']) < 4.6).all()
  assert logits.shape == (2, 1000)
