"""`pip install .` gives a working library: the package, its data, its console scripts and the
`python -m convert` shim, and no other top-level package (configs, experiments and tests stay in
the checkout); the Makefile's venv has it installed editable, so its commands run from any
directory. Installed offline with --no-deps (the dependencies are this venv's)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


PIP = ['-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation', '--no-index']


def copy_source(tmp_path: pathlib.Path) -> pathlib.Path:
  """The checkout's package sources: setuptools writes build/ and *.egg-info beside the code."""
  source = tmp_path / 'source'
  for name in ('ats_jax', 'convert', 'configs', 'experiments', 'pyproject.toml'):
    if (ROOT / name).is_dir():
      shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns('__pycache__'))
    else:
      shutil.copy(ROOT / name, source / name)
  return source


def test_pip_install_gives_the_package_its_data_and_console_scripts(tmp_path):
  source = copy_source(tmp_path)
  target = tmp_path / 'site'
  proc = subprocess.run(
    [sys.executable, *PIP, '--target', str(target), str(source)], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-3000:]

  installed = sorted(p.name for p in target.iterdir() if not p.name.endswith('-info'))
  assert installed == ['ats_jax', 'bin', 'convert'], installed
  assert (target / 'ats_jax' / 'data' / 'imagenet_classes.txt').is_file()
  assert (target / 'ats_jax' / 'convert' / 'big_vision.py').is_file()
  assert (target / 'convert' / '__main__.py').is_file()

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


def test_the_makefiles_venv_installs_the_package_editable_and_its_commands_run_anywhere(tmp_path):
  makefile = (ROOT / 'Makefile').read_text()
  recipe = makefile.split('\n$(VENV)/.runtime:', 1)[1].split('\n\n', 1)[0].splitlines()
  assert 'pyproject.toml' in recipe[0].split()  # a new command or package reinstalls
  assert '\t$(PY) -m pip install -q --no-deps -e .' in recipe[1:]
  # what that line does, offline: a venv that sees this one's packages, the package editable in it
  source, venv = copy_source(tmp_path), tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  (site_packages,) = venv.glob('lib/python*/site-packages')
  (site_packages / 'deps.pth').write_text(
    '\n'.join(p for p in sys.path if p.endswith('site-packages'))  # not the checkout
  )
  python = str(venv / 'bin' / 'python')
  proc = subprocess.run([python, *PIP, '-e', str(source)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]

  elsewhere = tmp_path / 'elsewhere'  # not the checkout, and no PYTHONPATH
  elsewhere.mkdir()
  env = {'PATH': os.environ.get('PATH', ''), 'JAX_PLATFORMS': 'cpu'}
  for command, shows in (
    ([python, '-m', 'convert', '--help'], 'usage: python -m convert'),
    ([str(venv / 'bin' / 'ats-jax-convert'), '--help'], 'usage: python -m convert'),
    ([str(venv / 'bin' / 'ats-jax-predict'), '--help'], '--checkpoint: Converted directory'),
  ):
    proc = subprocess.run(command, capture_output=True, text=True, cwd=elsewhere, env=env)
    assert proc.returncode == 0 and shows in proc.stdout, (command, proc.stderr[-2000:])
  where = subprocess.run(
    [python, '-c', 'import ats_jax, convert; print(ats_jax.__file__, convert.__file__)'],
    capture_output=True,
    text=True,
    cwd=elsewhere,
    env=env,
  )
  assert where.stdout.split() == [
    str(source / 'ats_jax' / '__init__.py'),
    str(source / 'convert' / '__init__.py'),
  ]
