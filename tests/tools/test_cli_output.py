"""The CLIs print their results and `error:` lines only; library INFO lines (the compilation
cache's, orbax's, JAX's) only with --verbosity=1."""

from __future__ import annotations

import re
import subprocess
import sys

import safetensors.torch
import skimage.data
from PIL import Image

from tests.references import random_timm_model

NAME = 'deit_tiny_patch16_224'
LOG_LINE = re.compile(r'^[IWEF]\d{4} ', re.MULTILINE)  # absl's 'I1207 03:34:36.24 ... file.py:1]'


def test_predict_and_convert_print_results_only_unless_verbose(tmp_path):
  weights = tmp_path / 'w.safetensors'
  safetensors.torch.save_file(random_timm_model(NAME, seed=0).state_dict(), weights)
  Image.fromarray(skimage.data.coffee()).save(tmp_path / 'coffee.jpg')
  predict = [sys.executable, '-m', 'ats_jax.predict', f'--checkpoint={weights}']
  predict += [f'--model={NAME}', f'--compile_cache_dir={tmp_path / "cache"}', '--dtype=float32']

  quiet = subprocess.run([*predict, str(tmp_path / 'coffee.jpg')], capture_output=True, text=True)
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  assert 'coffee.jpg: 1.25 GFLOPs' in quiet.stdout
  assert not LOG_LINE.search(quiet.stdout + quiet.stderr), quiet.stderr[-3000:]
  assert 'Compilation cache' not in quiet.stdout + quiet.stderr

  verbose = subprocess.run(
    [*predict, '--verbosity=1', str(tmp_path / 'coffee.jpg')], capture_output=True, text=True
  )
  assert verbose.returncode == 0, verbose.stderr[-3000:]
  assert 'Compilation cache' in verbose.stderr
  assert verbose.stdout == quiet.stdout  # the same results

  error = subprocess.run([*predict, str(tmp_path / 'missing.jpg')], capture_output=True, text=True)
  assert error.returncode == 1
  assert error.stderr.strip().splitlines() == [f'error: no such image file: {tmp_path}/missing.jpg']

  convert = [sys.executable, '-m', 'convert', str(weights)]
  converted = subprocess.run(
    [*convert, str(tmp_path / 'ckpt'), f'--model={NAME}'], capture_output=True, text=True
  )
  assert converted.returncode == 0, converted.stderr[-3000:]
  assert 'written     ' in converted.stdout
  assert not LOG_LINE.search(converted.stdout + converted.stderr), converted.stderr[-3000:]
  again = subprocess.run([*convert, str(tmp_path / 'ckpt')], capture_output=True, text=True)
  assert again.returncode == 1 and again.stderr.strip().startswith('error: '), again.stderr
  assert len(again.stderr.strip().splitlines()) == 1
