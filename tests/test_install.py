"""`pip install .` gives a working library: the package, its data, its console scripts, and no
other top-level package (configs, experiments, tests and the `convert` shim stay in the checkout).
Installed offline with --no-deps into a folder (the dependencies are this venv's)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_pip_install_gives_the_package_its_data_and_console_scripts(tmp_path):
  source = tmp_path / 'source'  # a copy: setuptools writes build/ and *.egg-info beside the code
  shutil.copytree(
    ROOT / 'ats_jax', source / 'ats_jax', ignore=shutil.ignore_patterns('__pycache__')
  )
  for name in ('pyproject.toml', 'convert', 'configs', 'experiments'):
    copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
    copy(ROOT / name, source / name)
  target = tmp_path / 'site'
  pip = [sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '--no-index']
  proc = subprocess.run(
    [*pip, '--quiet', '--target', str(target), str(source)], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-3000:]

  installed = sorted(p.name for p in target.iterdir() if not p.name.endswith('-info'))
  assert installed == ['ats_jax', 'bin'], installed
  assert (target / 'ats_jax' / 'data' / 'imagenet_classes.txt').is_file()
  assert (target / 'ats_jax' / 'convert' / 'big_vision.py').is_file()

  elsewhere = tmp_path / 'elsewhere'  # not the checkout: only the installed copy can be found
  elsewhere.mkdir()
  env = {'PATH': os.environ.get('PATH', ''), 'PYTHONPATH': str(target), 'JAX_PLATFORMS': 'cpu'}
  code = (
    'import ats_jax, ats_jax.models as m; from ats_jax.tools import predict; '
    'print(ats_jax.__file__); print(len(predict.imagenet_classes()), len(m.list_models()))'
  )
  proc = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, cwd=elsewhere, env=env
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  where, counts = proc.stdout.split()[0], proc.stdout.split()[1:]
  assert where.startswith(str(target)) and counts[0] == '1000', proc.stdout

  # console scripts, run from the installed copy
  predict = subprocess.run(
    [str(target / 'bin' / 'ats-jax-predict'), '--help'],
    capture_output=True,
    text=True,
    cwd=elsewhere,
    env=env,
  )
  assert predict.returncode == 0, predict.stderr[-2000:]
  assert predict.stdout.startswith('Classify image files with a checkpoint'), predict.stdout
  assert '--checkpoint: Converted directory' in predict.stdout.split('\nflags:\n')[1]
  convert = subprocess.run(
    [str(target / 'bin' / 'ats-jax-convert'), '--help'],
    capture_output=True,
    text=True,
    cwd=elsewhere,
    env=env,
  )
  assert convert.returncode == 0, convert.stderr[-2000:]
  assert 'output_dir' in convert.stdout and '--model' in convert.stdout
