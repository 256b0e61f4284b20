"""Preprocessing travels with the weights, and variant inference never guesses between families."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from flax import nnx

import convert.__main__ as convert_cli
from ats_jax.convert import pretrained
from ats_jax.data import device_images, input_pipeline
from ats_jax.models import MODELS, registry, vit
from ats_jax.training import train
from configs import default, digits_ats
from tests.helpers import flax_logits
from tests.references import random_timm_model, timm_logits


@pytest.mark.parametrize('name', [n for n in MODELS if n.startswith('vit_')])
def test_vit_data_configs_are_timms(name):
  cfg = timm.models.get_pretrained_cfg(name)  # the default (AugReg) tag's
  data = registry.data_config(name)
  assert (data.mean, data.std, data.interpolation) == (cfg.mean, cfg.std, cfg.interpolation)
  assert data.crop_pct == cfg.crop_pct  # 0.9 at 224, 1.0 at 384


def test_deit_data_config_is_deits_own():
  for name in (n for n in MODELS if n.startswith('deit_')):
    data = registry.data_config(name)
    assert data.mean == timm.data.IMAGENET_DEFAULT_MEAN
    assert data.std == timm.data.IMAGENET_DEFAULT_STD
    assert (data.crop_pct, data.interpolation) == (0.875, 'bicubic')  # DeiT: resize 256, crop 224


def test_augreg_state_dict_asks_for_model_then_converts_with_its_preprocessing(
  tmp_path, capsys, images
):
  """An AugReg ViT-Ti (-S) state dict has DeiT-Ti's (-S's) keys: the converter asks, not guesses."""
  reference = random_timm_model('vit_tiny_patch16_224', seed=7)
  deit_keys = random_timm_model('deit_tiny_patch16_224').state_dict()
  sd = reference.state_dict()
  assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in deit_keys.items()}
  src = tmp_path / 'augreg_ti.safetensors'
  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, src)
  out = tmp_path / 'out'

  assert convert_cli.main([str(src), str(out)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert 'deit_tiny_patch16_224 and vit_tiny_patch16_224' in err[0] and '--model' in err[0]
  assert not out.exists()

  assert convert_cli.main([str(src), str(out), '--model', 'vit_tiny_patch16_224']) == 0
  meta = json.loads((out / 'ats_jax.json').read_text())
  assert meta['data'] == dict(
    mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], crop_pct=0.9, interpolation='bicubic'
  )
  assert meta['layer_norm_eps'] == 1e-6
  x = images(batch=2)
  got, expected = flax_logits(out, 'vit_tiny_patch16_224', x), timm_logits(reference, x)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_deit_pth_records_deit_preprocessing(tmp_path):
  src = tmp_path / 'deit.pth'
  torch.save({'model': random_timm_model('deit_tiny_distilled_patch16_224').state_dict()}, src)
  converted = pretrained.convert_file(src)  # distilled: only DeiT has the keys, so inferred
  assert converted.model == 'deit_tiny_distilled_patch16_224'
  assert converted.data == registry.DEIT_DATA
  pretrained.save_converted(converted, tmp_path / 'out')
  loaded = pretrained.load_converted(tmp_path / 'out')
  assert (loaded.data, loaded.layer_norm_eps) == (registry.DEIT_DATA, 1e-6)


def eval_config(model: str, **data):
  config = default.get_config()
  config.model = model
  config.data.name, config.data.eval_split = 'digits', 'validation'
  config.eval_batch_size = 4
  with config.unlocked():
    for key, value in data.items():
      config.data[key] = value
  return config


def test_eval_preprocessing_comes_from_the_checkpoint_unless_the_config_overrides():
  vit = registry.VIT_DATA_224.to_json()
  # config.data.crop_pct = None: not set, so the checkpoint's (or the variant's) applies.
  cases = [
    ('deit_tiny_patch16_224', {}, registry.DEIT_DATA),
    ('vit_tiny_patch16_224', {}, registry.VIT_DATA_224),
    ('deit_tiny_patch16_224', dict(checkpoint_data=vit), registry.VIT_DATA_224),
    (
      'vit_tiny_patch16_384',
      dict(checkpoint_data=registry.DEIT_DATA.to_json()),
      registry.DEIT_DATA,
    ),
  ]
  for model, data, expected in cases:
    config = eval_config(model, crop_pct=None, **data)
    assert input_pipeline.eval_data_config(config) == expected, (model, data)
  overridden = eval_config(
    'vit_tiny_patch16_224', checkpoint_data=vit, crop_pct=1.0, mean=(0.1, 0.2, 0.3)
  )
  assert input_pipeline.eval_data_config(overridden) == registry.DataConfig(
    (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), 1.0, 'bicubic'
  )


def test_eval_batches_normalise_with_the_checkpoints_mean_and_std():
  """Batches are uint8 whatever the mean and std; the eval step normalises with the checkpoint's."""
  inception = registry.DataConfig((0.5,) * 3, (0.5,) * 3, 0.875, 'bicubic').to_json()
  deit = next(input_pipeline.eval_batches(eval_config('deit_tiny_patch16_224'), image_size=16))
  config = eval_config('deit_tiny_patch16_224', crop_pct=None, checkpoint_data=inception)
  vit = next(input_pipeline.eval_batches(config, image_size=16))
  np.testing.assert_array_equal(vit['image'], deit['image'])
  data = input_pipeline.eval_data_config(config)
  normalised = np.asarray(device_images.normalize(vit['image'], data.mean, data.std))
  np.testing.assert_allclose(normalised, vit['image'] / 255 / 0.5 - 1, atol=1e-6)


def test_evaluate_checkpoint_uses_the_checkpoints_preprocessing_and_eps(tmp_path, monkeypatch):
  """mode=evaluate builds the model with the checkpoint's LayerNorm eps and feeds it images
  prepared as the checkpoint records."""
  config = digits_ats.get_config()
  config.data.crop_pct = None  # None: the checkpoint's
  config.ats_blocks = ()  # one (dense) evaluation keeps the test short
  model = train.build_model(config, 10)
  params = {k: np.asarray(v[...]) for k, v in vit.param_dict(model).items()}
  data = registry.DataConfig((0.5,) * 3, (0.5,) * 3, 0.9, 'bilinear')
  converted = pretrained.Converted(config.model, params, 10, 24, 'test', (), data, 1e-12)
  pretrained.save_converted(converted, tmp_path / 'ckpt')
  config.checkpoint = str(tmp_path / 'ckpt')
  seen = {'data': [], 'eps': set()}
  eval_batches, build_model = input_pipeline.eval_batches, train.build_model

  def spy_batches(cfg, **kwargs):
    seen['data'].append(input_pipeline.eval_data_config(cfg))
    return eval_batches(cfg, **kwargs)

  def spy_build(cfg, num_classes, **overrides):
    built = build_model(cfg, num_classes, **overrides)
    seen['eps'] |= {m.epsilon for _, m in nnx.iter_modules(built) if isinstance(m, nnx.LayerNorm)}
    return built

  step_fn = train.eval_step_fn

  def spy_step_fn(graphdef, mesh, mean, std):
    seen['normalisation'] = (mean, std)
    return step_fn(graphdef, mesh, mean, std)

  monkeypatch.setattr(input_pipeline, 'eval_batches', spy_batches)
  monkeypatch.setattr(train, 'build_model', spy_build)
  monkeypatch.setattr(train, 'eval_step_fn', spy_step_fn)
  results = train.evaluate_checkpoint(config, None)
  assert set(results) == {'dense'}
  assert seen['data'] == [data] and seen['eps'] == {1e-12}
  assert seen['normalisation'] == (data.mean, data.std)
