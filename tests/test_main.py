"""`main.py` end to end as a user runs it."""

from __future__ import annotations

import ast
import subprocess
import sys

import jax
import numpy as np
import torch

import convert.__main__ as convert_cli
from tests.conftest import random_timm_model, timm_logits

NAME = 'deit_tiny_patch16_224'


def run_main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, 'main.py', *args],
    capture_output=True,
    text=True,
    check=False,
    env={'JAX_PLATFORMS': 'cpu', 'PATH': ''},
  )


def test_describe_runs_a_converted_model_and_predicts_as_timm(tmp_path, capsys):
  reference = random_timm_model(NAME, seed=4)
  torch.save({'model': reference.state_dict()}, tmp_path / 'w.pth')
  assert convert_cli.main([str(tmp_path / 'w.pth'), str(tmp_path / 'ckpt'), '--model', NAME]) == 0
  capsys.readouterr()
  proc = run_main(
    '--config=configs/deit_t.py',
    f'--config.checkpoint={tmp_path / "ckpt"}',
    '--config.mode=describe',
    '--config.eval_batch_size=3',
    '--config.seed=7',
  )
  assert proc.returncode == 0, proc.stderr
  assert all(
    f'| {name} |' in proc.stdout
    for name in ('deit_tiny_patch16_224', 'deit_base_distilled_patch16_224')
  )
  assert 'GFLOPs/image: 1.25 (dense 1.25)' in proc.stdout
  printed = ast.literal_eval(proc.stdout.split('top-1 class of each image ')[1].strip())
  images = np.asarray(jax.random.normal(jax.random.key(7), (3, 224, 224, 3)))
  assert printed == timm_logits(reference, images).argmax(-1).tolist()


def test_bad_config_values_are_one_line_errors(tmp_path):
  describe, digits = ('--config=configs/deit_t.py', '--config.mode=describe'), (
    '--config=configs/digits_ats.py', f'--workdir={tmp_path / "run"}')  # fmt: skip
  cases = {
    ('--config=configs/deit_t.py', '--config.nope=1'): 'names no config field',
    ('--config=configs/deit_t.py', '--config.batch_size=abc'): 'batch_size',
    ('--config=configs/missing.py',): 'No such file',
    (*describe, '--config.model=deit_huge'): "unknown model 'deit_huge'",
    ('--config=configs/deit_t.py', '--config.mode=fit'): "config.mode='fit' is not one of",
    (*describe, f'--config.checkpoint={tmp_path}'): 'not a converted checkpoint',
    ('--config=configs/digits_ats.py',): 'training needs --workdir',
    (*digits, '--config.data.name=no_such_set'): "unknown dataset 'no_such_set'",
    (*digits, '--config.data.name=folder', f'--config.data.data_dir={tmp_path / "nope"}'): 'nope',
    (*digits, '--config.data.name=cifar10', f'--config.data.data_dir={tmp_path}'): 'not prepared',
    (*digits, '--config.ats_blocks=(2, 9)'): 'ats_blocks [2, 9] must be distinct block indices',
    (*digits, '--config.mode=evaluate'): 'nothing to evaluate',
  }
  for args, message in cases.items():
    proc = run_main(*args)
    assert proc.returncode == 1, args
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and message in last, (args, proc.stderr)
    assert 'Traceback' not in proc.stderr, args
