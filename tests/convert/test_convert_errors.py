"""Bad converter input: one `error:` line naming the problem, exit 1, nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import convert.__main__ as convert_cli
from ats_jax.convert.timm import resize_pos_embed
from ats_jax.models import CheckpointError, create_model
from tests.references import random_timm_model

NAME = 'deit_tiny_patch16_224'


@pytest.fixture(scope='module')
def state_dict():
  return random_timm_model(NAME).state_dict()


def run_cli(capsys, *argv) -> str:
  """Runs the CLI in-process; asserts it failed with exactly one stderr line, which it returns."""
  assert convert_cli.main([str(a) for a in argv]) == 1
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), captured.err
  assert captured.out == ''
  return lines[0]


def assert_nothing_written(tmp_path, out):
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


def test_missing_file_from_the_real_cli(tmp_path):
  out = tmp_path / 'out'
  proc = subprocess.run(
    [sys.executable, '-m', 'convert', str(tmp_path / 'nope.pth'), str(out)],
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip() == f'error: no such file: {tmp_path / "nope.pth"}'
  assert 'Traceback' not in proc.stderr
  assert_nothing_written(tmp_path, out)


def test_not_a_checkpoint(tmp_path, capsys):
  src = tmp_path / 'photo.pth'
  src.write_bytes(b'\xff\xd8\xff\xe0 a JPEG, not a checkpoint')
  assert 'is not a PyTorch checkpoint' in run_cli(capsys, src, tmp_path / 'out')
  assert_nothing_written(tmp_path, tmp_path / 'out')


def test_pickle_that_holds_no_state_dict(tmp_path, capsys):
  src = tmp_path / 'list.pth'
  torch.save([1, 2, 3], src)
  assert 'does not hold a state dict' in run_cli(capsys, src, tmp_path / 'out')


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_truncated_file(tmp_path, capsys, state_dict, suffix):
  src = tmp_path / f'full{suffix}'
  if suffix == '.pth':
    torch.save({'model': state_dict}, src)
  else:
    safetensors.torch.save_file(state_dict, src)
  data = src.read_bytes()
  cut = tmp_path / f'cut{suffix}'
  cut.write_bytes(data[: len(data) // 2])
  assert 'truncated' in run_cli(capsys, cut, tmp_path / 'out')
  assert_nothing_written(tmp_path, tmp_path / 'out')


def test_missing_and_unexpected_keys_are_named(tmp_path, capsys, state_dict):
  broken = dict(state_dict)
  del broken['blocks.3.mlp.fc1.bias']
  broken['blocks.0.attn.gate.weight'] = torch.zeros(3)
  src = tmp_path / 'broken.pth'
  torch.save({'model': broken}, src)
  line = run_cli(capsys, src, tmp_path / 'out', '--model', NAME)
  assert 'missing keys: blocks.3.mlp.fc1.bias' in line
  assert 'unexpected keys: blocks.0.attn.gate.weight' in line
  assert_nothing_written(tmp_path, tmp_path / 'out')


def test_shape_that_does_not_fit_the_chosen_variant(tmp_path, capsys, state_dict):
  src = tmp_path / 'tiny.pth'
  torch.save(state_dict, src)
  line = run_cli(capsys, src, tmp_path / 'out', '--model', 'deit_small_patch16_224')
  assert 'has shape' in line and 'deit_small_patch16_224 expects' in line


def test_unknown_architecture_cannot_be_inferred(tmp_path, capsys, state_dict):
  shallow = {k: v for k, v in state_dict.items() if not k.startswith(('blocks.5', 'blocks.1'))}
  src = tmp_path / 'shallow.pth'
  torch.save(shallow, src)
  assert 'no registered model has embed_dim=192, depth=' in run_cli(capsys, src, tmp_path / 'out')


def test_existing_output_needs_force(tmp_path, capsys, state_dict):
  src = tmp_path / 'tiny.pth'
  torch.save(state_dict, src)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  assert 'already exists (use --force' in run_cli(capsys, src, out, '--model', NAME)
  assert (out / 'keep.txt').read_text() == 'mine'
  assert convert_cli.main([str(src), str(out), '--force', '--model', NAME]) == 0
  assert sorted(os.listdir(out)) == ['ats_jax.json', 'params']


def test_create_model_rejects_bad_names_and_options(tmp_path):
  with pytest.raises(ValueError, match="unknown model 'deit_huge'.*deit_tiny_patch16_224"):
    create_model('deit_huge')
  with pytest.raises(TypeError, match=r"unknown model options \['drop_rate'\]"):
    create_model(NAME, drop_rate=0.1)
  with pytest.raises(CheckpointError, match='not a converted checkpoint'):
    create_model(NAME, checkpoint=tmp_path)


def test_class_count_override_that_the_checkpoint_does_not_fit(tmp_path, state_dict):
  src = tmp_path / 'tiny.pth'
  torch.save(state_dict, src)
  with pytest.raises(
    CheckpointError,
    match=r'head\.bias has shape \(1000,\) in the checkpoint but .* expects \(10,\)',
  ):
    create_model(NAME, checkpoint=src, num_classes=10)


@pytest.mark.parametrize('old,new', [(14, 24), (24, 14), (14, 7)])
def test_pos_embed_resize_equals_torch_antialiased_bicubic(old, new):
  rng = np.random.default_rng(0)
  pos = rng.standard_normal((1, 1 + old * old, 8), dtype=np.float32)
  grid = torch.from_numpy(pos[:, 1:]).reshape(1, old, old, 8).permute(0, 3, 1, 2)
  expected = F.interpolate(grid, size=(new, new), mode='bicubic', antialias=True)
  expected = expected.permute(0, 2, 3, 1).reshape(1, new * new, 8).numpy()
  got = resize_pos_embed(pos, new, num_prefix_tokens=1)
  np.testing.assert_array_equal(got[:, :1], pos[:, :1])
  np.testing.assert_allclose(got[:, 1:], expected, atol=1e-5)
