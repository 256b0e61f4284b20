"""`main.py` end to end as a user runs it."""

from __future__ import annotations

import ast
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import torch

import convert.__main__ as convert_cli
from tests.references import random_timm_model, timm_logits

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


def test_bad_flags_are_one_line_errors_of_the_process(tmp_path):
  """Errors of the command line itself: the process ends with status 1 and one `error:` line."""
  cases = {
    ('--config=configs/deit_t.py', '--config.nope=1'): '--config.nope names no config field',
    ('--config=configs/deit_t.py', '--config.ats_block=3'): (
      "--config.ats_block names no config field; did you mean 'ats_blocks'?"
    ),
    ('--config=configs/deit_t.py', '--config.data.nme=x'): (
      "--config.data.nme names no config field; did you mean 'name'?"
    ),
    ('--config=configs/deit_t.py', '--config.batch_size=abc'): 'batch_size',
    ('--config=configs/missing.py',): 'No such file',
    ('--config=configs/deit_t.py', '--config.mode=fit'): "config.mode='fit' is not one of",
    ('--config=configs/digits_ats.py',): 'training needs --workdir',
    ('--config=configs/digits_ats.py', f'--workdir={tmp_path / "run"}', '--config.mode=evaluate'): (
      'nothing to evaluate'
    ),  # one that gets past start-up to the library, as the in-process cases below
  }
  for args, message in cases.items():
    proc = run_main(*args)
    assert proc.returncode == 1, args
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and message in last, (args, proc.stderr)
    if 'config field' in message:  # the whole output: one line
      assert proc.stderr == f'error: {message}\n', proc.stderr
    assert 'Traceback' not in proc.stderr, args


def test_bad_config_values_are_one_line_errors(tmp_path, monkeypatch, request):
  """Errors the library raises, through `main.main` in this process (no start-up per case):
  each ends the run with a one-line `error:` message (SystemExit, which Python prints as the last
  line with status 1, as the case above shows for a whole process)."""
  from absl import flags
  from absl import logging as absl_logging

  import main
  from ats_jax.training import runtime
  from configs import deit_t, digits_ats

  monkeypatch.setattr(runtime, 'enable_compile_cache', lambda *args: None)  # not in this process
  monkeypatch.setattr(absl_logging.get_absl_handler(), 'filters', [])  # main adds one: undone
  parsed = flags.FLAGS.is_parsed()
  if not parsed:
    flags.FLAGS.mark_as_parsed()  # main reads --verbosity (its default here)
    request.addfinalizer(flags.FLAGS.unparse_flags)

  def describe(**changes):
    return dict(config=deit_t.get_config(), workdir=None, mode='describe', **changes)

  def digits(**changes):
    return dict(config=digits_ats.get_config(), workdir=str(tmp_path / 'run'), **changes)

  cases = [
    (describe(model='deit_huge'), "unknown model 'deit_huge'"),
    (describe(checkpoint=str(tmp_path)), 'not a converted checkpoint'),
    (digits(**{'data.name': 'no_such_set'}), "unknown dataset 'no_such_set'"),
    (digits(**{'data.name': 'folder', 'data.data_dir': str(tmp_path / 'nope')}), 'nope'),
    (digits(**{'data.name': 'cifar10', 'data.data_dir': str(tmp_path)}), 'not prepared'),
    (digits(ats_blocks=(2, 9)), 'ats_blocks [2, 9] must be distinct block indices'),
    (digits(mode='evaluate'), 'nothing to evaluate'),
  ]
  for case, message in cases:
    config, workdir = case.pop('config'), case.pop('workdir')
    for key, value in case.items():
      *parents, field = key.split('.')
      node = config
      for parent in parents:
        node = node[parent]
      node[field] = value
    monkeypatch.setattr(main, '_CONFIG', types.SimpleNamespace(value=config))  # as parsed
    monkeypatch.setattr(main, '_WORKDIR', types.SimpleNamespace(value=workdir))
    with pytest.raises(SystemExit) as exit_:
      main.main([])
    error = str(exit_.value.code)
    assert error.startswith('error: ') and message in error and '\n' not in error, (case, error)
