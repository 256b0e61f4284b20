"""The documentation says what the code does: every README command is run by a test or the demo,
the quickstart runs as written, every relative link resolves, every documented config field exists.
"""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
DOCS = sorted((ROOT / 'docs').glob('*.md'))
RESULTS = ROOT / 'experiments' / 'results' / 'README.md'
QUICKSTART = 'tests/test_docs.py::test_quickstart_runs_as_written'

# Each README command and what runs it: this file's quickstart test, the demo, or the test that runs
# the same code path on a small model (the command itself needs ImageNet, a GPU or days).
COMMANDS = {
  'make demo': 'Makefile: demo',
  'make test': 'Makefile: test',
  'make test-fast': 'Makefile: test-fast',
  'pip install .': 'tests/test_docs.py::test_install_extras_and_console_scripts_exist',
  "pip install '.[gpu]'": 'tests/test_docs.py::test_install_extras_and_console_scripts_exist',
  "pip install '.[tpu]'": 'tests/test_docs.py::test_install_extras_and_console_scripts_exist',
  "pip install '.[test]'": 'tests/test_docs.py::test_install_extras_and_console_scripts_exist',
  'python -m ats_jax.predict': QUICKSTART,
  'python -m convert': QUICKSTART,
  'python -m experiments.visualize_tokens': (
    'tests/test_experiment_scripts.py::test_visualize_tokens_draws_the_kept_patches'
  ),
  'python -m convert deit_small_patch16_224-cd65a155.pth ckpt/deit_s '
  '--model=deit_small_patch16_224': QUICKSTART,
  'python -m ats_jax.predict --checkpoint=ckpt/deit_s --ats_blocks=3,4,5,6,7,8,9,10,11 '
  '--num_tokens=197 --save_tokens=tokens cat.jpg': QUICKSTART,
  'python main.py --config=configs/deit_s_ats.py --config.mode=evaluate '
  '--config.checkpoint=ckpt/deit_s --config.data.name=folder --config.data.data_dir=ILSVRC2012 '
  '--config.data.eval_split=val --workdir=runs/eval': (
    'tests/data/test_image_decoding.py::test_folder_evaluates_to_timms_top1_on_the_same_weights'
  ),
  'python main.py --config=configs/deit_s.py --workdir=runs/deit_s': (
    'tests/training/test_train.py::test_a_run_killed_after_a_checkpoint_resumes_to_the_same_parameters'
  ),
  'python main.py --config=configs/deit_s_ats.py --workdir=runs/ft --config.init_from=ckpt/deit_s '
  '--config.num_epochs=30 --config.base_lr=5e-5 --config.warmup_epochs=0': (
    'tests/training/test_train.py::test_init_from_loads_pretrained_weights_and_reinitialises_another_head'
  ),
}
PYTHON_BLOCKS = 1  # the quickstart's API example, run as written by QUICKSTART
NOT_COMMANDS = ('python -m ats_jax.predict', 'python -m convert')  # names, run via the quickstart


def fenced_blocks(text: str, language: str) -> list[str]:
  return re.findall(rf'^```{language}\n(.*?)^```', text, flags=re.M | re.S)


def shell_commands(text: str) -> list[str]:
  """The commands of a markdown file: each line of its bash blocks (continuations joined, comments
  dropped), and inline code that starts with python, make or pip."""
  commands = []
  for block in fenced_blocks(text, 'bash'):
    for line in block.replace('\\\n', ' ').splitlines():
      line = re.sub(r'\s+#.*$', '', line).strip()
      if line and not line.startswith('#'):
        commands.append(' '.join(line.split()))
  inline = re.findall(r'(?<!`)`((?:python|make|pip) [^`]+)`', text)
  return commands + [' '.join(c.split()) for c in inline]


def test_readme_is_short_and_every_command_in_it_is_run_somewhere():
  text = README.read_text()
  assert len(text.splitlines()) < 250
  assert set(shell_commands(text)) == set(COMMANDS)
  assert len(fenced_blocks(text, 'python')) == PYTHON_BLOCKS
  makefile = (ROOT / 'Makefile').read_text()
  for command, where in COMMANDS.items():
    if where.startswith('Makefile: '):
      assert re.search(rf'^{where.removeprefix("Makefile: ")}:', makefile, re.M), command
      continue
    path, name = where.split('::')
    source = (ROOT / path).read_text()
    assert re.search(rf'^def {name}\(', source, re.M), f'{command}: {where} does not exist'


def _config_fields(config, prefix: str = '') -> set[str]:
  fields = set()
  for key, value in config.items():
    fields.add(prefix + key)
    if hasattr(value, 'items'):
      fields |= _config_fields(value, f'{prefix}{key}.')
  return fields


def _default_fields() -> set[str]:
  sys.path.insert(0, str(ROOT))
  return _config_fields(importlib.import_module('configs.default').get_config())


def _documented_fields(text: str) -> set[str]:
  """`config.a.b` and `config.a.{b,c}` in a text as 'a.b' (`config.json`, `config.x`: no fields)."""
  fields = set()
  for head, braces in re.findall(r'\bconfig\.([a-z_.]*[a-z_])(?:\.\{([a-z_,]+)\})?', text):
    names = [f'{head}.{b}' for b in braces.split(',')] if braces else [head]
    fields |= {n for n in names if n not in ('json', 'x')}
  return fields


def test_every_documented_config_field_exists():
  fields = _default_fields()
  for path in [README, *DOCS, RESULTS]:
    for field in _documented_fields(path.read_text()):
      if field.startswith('model_overrides.'):  # any VisionTransformer field
        continue
      assert field in fields, f'{path.name} documents config.{field}, not in configs/default.py'


def test_every_config_override_in_a_command_names_a_field_of_its_config():
  for path in [README, *DOCS, RESULTS]:
    for command in shell_commands(path.read_text()):
      config_file = re.search(r'--config=(configs/\w+\.py)', command)
      if not config_file:
        continue
      module = importlib.import_module(config_file.group(1)[:-3].replace('/', '.'))
      fields = _config_fields(module.get_config())
      for field in re.findall(r'--config\.([a-z_.]+)=', command):
        assert field in fields, f'{path.name}: {command} sets config.{field}'


def test_predict_and_convert_flags_in_the_docs_exist():
  predict = (ROOT / 'ats_jax' / 'tools' / 'predict.py').read_text()
  predict_flags = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", predict))
  convert = (ROOT / 'ats_jax' / 'convert' / 'cli.py').read_text()
  convert_flags = set(re.findall(r"add_argument\(\s*'--([\w-]+)'", convert))
  for path in [README, *DOCS]:
    for command in shell_commands(path.read_text()):
      if command.startswith('python -m ats_jax.predict '):
        assert set(re.findall(r'--(\w+)=', command)) <= predict_flags, command
      if command.startswith('python -m convert '):
        assert set(re.findall(r'--([\w-]+)', command)) <= convert_flags, command


def _anchors(path: pathlib.Path) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
  headings = re.findall(r'^#+ (.+)$', path.read_text(), flags=re.M)
  return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-') for h in headings}


def test_every_relative_link_points_at_an_existing_file_and_heading():
  for path in [README, *DOCS, RESULTS]:
    for target in re.findall(r'\]\(([^)\s]+)\)', path.read_text()):
      if re.match(r'[a-z]+://', target):
        continue
      file, _, anchor = target.partition('#')
      linked = (path.parent / file).resolve() if file else path
      assert linked.exists(), f'{path.name} links to {target}: no such file'
      if anchor and linked.suffix == '.md':
        assert anchor in _anchors(linked), f'{path.name} links to {target}: no such heading'


def test_install_extras_and_console_scripts_exist():
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  assert {'gpu', 'tpu', 'test'} <= set(project['optional-dependencies'])
  scripts = project['scripts']
  assert {'ats-jax-predict', 'ats-jax-convert'} <= set(scripts)
  for target in scripts.values():  # 'package.module:function'
    module, function = target.split(':')
    assert callable(getattr(importlib.import_module(module), function))


def test_demo_table_agrees_with_the_config_docstring():
  """The README's demo numbers are the ones `configs/digits_ats.py` states (one decimal)."""
  text = README.read_text()
  table = text.split('<!-- demo output -->')[1]
  rows = {r[1].strip(): r for r in (line.split('|') for line in table.splitlines()) if len(r) > 3}
  docstring = ast.get_docstring(ast.parse((ROOT / 'configs' / 'digits_ats.py').read_text()))
  for model in ('ats', 'dense'):
    assert f'{float(rows[model][2]):.1f}%' in docstring, (model, rows[model][2])


def _run(command: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  """A README command as written, with `python` this interpreter and the repository importable."""
  env = os.environ | {'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  args = command.split()
  args[0] = sys.executable if args[0] == 'python' else args[0]
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def quickstart_dir(tmp_path_factory):
  """A folder holding what the quickstart assumes: DeiT-S weights under the release's file name
  (random, timm's layout: `{'model': state_dict}`) and a photo of a cat."""
  import skimage.data
  import timm
  import torch
  from PIL import Image

  path = tmp_path_factory.mktemp('quickstart')
  torch.manual_seed(0)
  model = timm.create_model('deit_small_patch16_224', pretrained=False)
  torch.save({'model': model.state_dict()}, path / 'deit_small_patch16_224-cd65a155.pth')
  Image.fromarray(skimage.data.chelsea()).save(path / 'cat.jpg')
  return path


def test_quickstart_runs_as_written(quickstart_dir):
  """Convert, classify a photo with ATS, the Python API: the README's own text, run in order."""
  text = README.read_text()
  commands = [c for c in shell_commands(text) if COMMANDS.get(c) == QUICKSTART]
  commands = [c for c in commands if c not in NOT_COMMANDS]
  assert [c.split()[2] for c in commands] == ['convert', 'ats_jax.predict']
  for command in commands:
    proc = _run(command, quickstart_dir)
    assert proc.returncode == 0, f'{command}\n{proc.stderr[-2000:]}'
  assert (quickstart_dir / 'ckpt' / 'deit_s' / 'ats_jax.json').exists()
  assert 'kept tokens per ATS block 3:' in proc.stdout  # predict's report
  assert (quickstart_dir / 'tokens' / 'cat.png').exists()
  (block,) = fenced_blocks(text, 'python')
  (quickstart_dir / 'api.py').write_text(block)
  proc = _run('python api.py', quickstart_dir)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip(), 'the API example prints the kept tokens and GFLOPs'
