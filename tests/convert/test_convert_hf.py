"""Hugging Face ViT/DeiT directories (`save_pretrained`) convert to the logits `transformers` gives,
with the architecture, LayerNorm eps (1e-12) and preprocessing their files record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers  # a test requirement: a missing reference fails, never skips

import convert.__main__ as convert_cli
from ats_jax.convert import pretrained
from ats_jax.models import registry
from tests.helpers import flax_logits
from tests.references import HF_TINY, hf_logits, random_hf_model


@pytest.mark.parametrize(
  'kind,name,model_flag,safe',
  [
    ('vit', 'vit_tiny_patch16_224', ['--model', 'vit_tiny_patch16_224'], True),
    ('deit', 'deit_tiny_distilled_patch16_224', [], True),  # model_type deit: inferred
    ('deit', 'deit_tiny_distilled_patch16_224', [], False),  # pytorch_model.bin
  ],
)
def test_hf_directory_matches_transformers(tmp_path, images, capsys, kind, name, model_flag, safe):
  reference = random_hf_model(kind)
  src = tmp_path / 'hf'
  reference.save_pretrained(src)  # Hub names: deit.encoder.layer.0.attention.attention.query...
  if not safe:  # transformers 5 writes only safetensors; a .bin with its in-memory names instead
    (src / 'model.safetensors').unlink()
    torch.save(reference.state_dict(), src / 'pytorch_model.bin')
    assert 'deit.layers.0.attention.q_proj.weight' in reference.state_dict()
  out = tmp_path / 'converted'
  capsys.readouterr()
  assert convert_cli.main([str(src), str(out), *model_flag]) == 0
  meta = json.loads((out / 'ats_jax.json').read_text())
  assert meta['model'] == name and meta['num_classes'] == 10
  assert meta['layer_norm_eps'] == 1e-12  # transformers' default, not timm's 1e-6
  assert 'layer norm  eps 1e-12' in capsys.readouterr().out

  x = images(batch=2)
  got, expected = flax_logits(out, name, x), hf_logits(reference, x)
  fmt = 'safetensors' if safe else 'bin'
  print(f'{kind} ({fmt}): max |logit diff| {np.abs(got - expected).max():.2e}')
  assert got.shape == expected.shape == (2, 10)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  assert np.abs(expected).max() > 0.5


def test_hf_vit_config_does_not_say_which_family(tmp_path, capsys):
  """A `vit` config holds DeiT weights (facebook/deit-*) as well as Google's: --model decides."""
  src = tmp_path / 'hf'
  random_hf_model('vit').save_pretrained(src)
  capsys.readouterr()  # transformers' progress bars
  assert convert_cli.main([str(src), str(tmp_path / 'out')]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert 'deit_tiny_patch16_224 and vit_tiny_patch16_224' in err[0] and '--model' in err[0]


def test_hf_head_count_must_match_the_variant(tmp_path):
  torch.manual_seed(0)
  config = transformers.ViTConfig(**HF_TINY | dict(num_attention_heads=4))
  transformers.ViTForImageClassification(config).save_pretrained(tmp_path / 'hf')
  with pytest.raises(pretrained.CheckpointError, match='4 heads but vit_tiny_patch16_224 has 3'):
    pretrained.convert_file(tmp_path / 'hf', 'vit_tiny_patch16_224')


DEIT_HUB = dict(image_mean=list(registry.IMAGENET_MEAN), image_std=list(registry.IMAGENET_STD))


@pytest.mark.parametrize(
  'processor,options,expected',
  [  # as facebook/deit-* on the Hub: ImageNet mean/std, resize 256, crop 224, bicubic
    ('DeiTImageProcessor', DEIT_HUB, registry.DEIT_DATA),
    ('ViTImageProcessor', {}, registry.DataConfig((0.5,) * 3, (0.5,) * 3, 1.0, 'bilinear')),
  ],
)
def test_preprocessor_config_travels_with_the_weights(tmp_path, processor, options, expected):
  src = tmp_path / 'hf'
  random_hf_model('deit').save_pretrained(src)
  getattr(transformers, processor)(**options).save_pretrained(src)
  converted = pretrained.convert_file(src)
  assert converted.data == expected
  pretrained.save_converted(converted, tmp_path / 'out')
  assert pretrained.load_converted(tmp_path / 'out').data == expected


def test_hf_label_names_travel_into_the_converted_checkpoint(tmp_path, capsys):
  """id2label names the outputs (evaluation maps a folder's classes onto them by name);
  transformers' default 'LABEL_i' names nothing."""
  reference = random_hf_model('vit')
  names = tuple(f'class {c}' for c in 'abcdefghij')
  reference.config.id2label = dict(enumerate(names))
  reference.save_pretrained(tmp_path / 'named')
  random_hf_model('vit').save_pretrained(tmp_path / 'default')
  capsys.readouterr()
  for src, expected in (('named', names), ('default', None)):
    out = tmp_path / f'{src}_converted'
    assert convert_cli.main([str(tmp_path / src), str(out), '--model', 'vit_tiny_patch16_224']) == 0
    on_the_fly = pretrained.load_checkpoint(tmp_path / src, 'vit_tiny_patch16_224')
    assert on_the_fly.labels == expected
    assert pretrained.load_converted(out).labels == expected  # and written into ats_jax.json
