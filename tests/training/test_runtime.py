"""Start-up around the model: dtype per platform, the distributed switch, compiling once, logs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ats_jax import backend
from ats_jax.data import input_pipeline
from ats_jax.data.labels import Labels
from ats_jax.models import vit
from ats_jax.training import progress, runtime, sharding, train
from tests.helpers import ENV, TINY_FLAGS, tiny_config


@pytest.mark.parametrize(
  ('platform', 'name', 'expected'),
  [
    ('gpu', 'auto', jnp.bfloat16),
    ('tpu', 'auto', jnp.bfloat16),
    ('cpu', 'auto', jnp.float32),
    ('gpu', 'float32', jnp.float32),
    ('cpu', 'bfloat16', jnp.bfloat16),
  ],
)
def test_auto_dtype_is_bfloat16_on_accelerators_and_params_logits_stay_float32(
  monkeypatch, platform, name, expected
):
  monkeypatch.setattr(backend, 'platform', lambda: platform)
  config = tiny_config(dtype=name)
  assert train.model_options(config)['dtype'] == jnp.dtype(expected)
  model = train.build_model(config, num_classes=10)
  model.eval()
  assert model.dtype == jnp.dtype(expected)
  assert {p.dtype for p in vit.param_dict(model).values()} == {jnp.dtype(jnp.float32)}
  images = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
  logits, stats = model(images, return_stats=True)
  assert logits.dtype == jnp.float32 and stats['gflops'].dtype == jnp.float32


def test_the_distributed_switch(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda: calls.append(1))
  cluster, alone = {'SLURM_NTASKS': '4'}, {}
  assert not runtime.initialize_distributed('auto', alone)
  assert runtime.initialize_distributed('auto', cluster)
  assert runtime.initialize_distributed('auto', {'TPU_WORKER_HOSTNAMES': 'a,b'})
  assert runtime.initialize_distributed('on', alone)  # e.g. a TPU pod slice
  assert not runtime.initialize_distributed('off', cluster)
  assert len(calls) == 3
  with pytest.raises(ValueError, match="config.distributed='yes' is not one of"):
    runtime.initialize_distributed('yes', alone)


def test_periodic_evaluation_compiles_its_step_once():
  config = tiny_config()
  graphdef, params = nnx.split(train.build_model(config, num_classes=10))
  mesh = sharding.make_mesh()
  labels = Labels(10, input_pipeline.DIGITS_CLASSES)
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event)  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    results = []
    for _ in range(2):  # as eval_every_steps does: the same architecture, new parameters
      params = jax.tree.map(lambda p: p * 1.01, params)
      compiles.clear()
      results.append(train.evaluate(config, graphdef, params, mesh, 16, (1,), labels, 'ats'))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert '/jax/core/compile/backend_compile_duration' not in compiles  # the second pass
  assert results[0]['examples'] == results[1]['examples'] == 360


# main.py with JAX's own compile counters: one backend-compile event per program that reaches
# XLA (compiled or loaded from the persistent cache), one cache-hit event per program loaded.
COUNTING_MAIN = """
import atexit, json, runpy, sys
import jax
counts = {'programs': 0, 'hits': 0}
def program(event, duration, **kwargs):
  counts['programs'] += event == '/jax/core/compile/backend_compile_duration'
def hit(event, **kwargs):
  counts['hits'] += event == '/jax/compilation_cache/cache_hits'
jax.monitoring.register_event_duration_secs_listener(program)
jax.monitoring.register_event_listener(hit)
out = sys.argv.pop(1)
atexit.register(lambda: open(out, 'w').write(json.dumps(counts)))
runpy.run_path('main.py', run_name='__main__')
"""
# One chunk and one attention size: the programs compile fast; what is cached is the same.
QUICK_FLAGS = ('--config.pack_chunks=1', '--config.attention_sizes=1')


def run_main(workdir, *overrides: str, counts=None) -> subprocess.CompletedProcess:
  """main.py on the tiny digits config, stderr a pipe (not a terminal), as in a log file; with
  `counts` (a path) JAX's compile counters are written there as JSON."""
  args = [*TINY_FLAGS, '--config.eval_batch_size=120', *QUICK_FLAGS]
  command = ['-c', COUNTING_MAIN, str(counts)] if counts else ['main.py']
  return subprocess.run(
    [sys.executable, *command, '--config=configs/digits_ats.py', f'--workdir={workdir}', *args]
    + list(overrides),
    capture_output=True,
    text=True,
    check=True,
    env={k: v for k, v in ENV.items() if k != 'TF_CPP_MIN_LOG_LEVEL'},  # as a user has it
  )


def cache_use(stderr: str) -> tuple[int, int]:
  """(loaded, compiled) from main.py's compilation cache line."""
  found = re.findall(r'Compilation cache .*: (\d+) programs loaded, (\d+) compiled', stderr)
  assert len(found) == 1, stderr
  return int(found[0][0]), int(found[0][1])


def test_quiet_logs_then_a_second_evaluation_compiles_nothing(tmp_path):
  # Training, quietly: one line per checkpoint, no orbax/TensorFlow chatter, no redrawn bar.
  trained = run_main(
    tmp_path / 'run',
    '--config.num_steps=4',
    '--config.distributed=off',
    '--config.compile_cache_dir=',
  )
  lines = (trained.stdout + trained.stderr).splitlines()
  assert len(lines) <= 32, '\n'.join(lines)  # 6 of them say what compiles, and for how long
  saves = [line for line in lines if 'Saving checkpoint' in line]
  assert [s.split('Saving checkpoint ')[1].split()[0] for s in saves] == ['2', '4']
  for chatter in ('checkpoint_manager.py', 'oneDNN', 'absl::InitializeLog', 'xla_bridge', '\r'):
    assert chatter not in trained.stderr, chatter
  assert 'Compilation cache' not in trained.stderr  # '' turns it off
  assert 'eval ats 3/3 batches' in trained.stderr  # plain lines, naming the model
  assert 'eval dense 3/3 batches' in trained.stderr
  assert '| ats |' in trained.stdout and '| dense |' in trained.stdout
  assert 'Parameters: ' in trained.stderr and (tmp_path / 'run' / 'parameters.txt').exists()

  # Evaluate twice, identically (the default compile_cache_min_secs): JAX's counters show that the
  # second run compiles nothing, every program it runs comes from the persistent cache.
  cache = ('--config.mode=evaluate', f'--config.compile_cache_dir={tmp_path / "cache"}')
  counted = [tmp_path / 'first.json', tmp_path / 'second.json']
  first, second = (run_main(tmp_path / 'run', *cache, counts=path) for path in counted)
  first_counts, second_counts = (json.loads(path.read_text()) for path in counted)
  programs = first_counts['programs']
  assert programs >= 2 and first_counts['hits'] == 0  # the ATS and the dense evaluation steps
  assert second_counts == {'programs': programs, 'hits': programs}
  assert cache_use(first.stderr) == (0, programs) and cache_use(second.stderr) == (programs, 0)
  rows = [run.stdout.splitlines()[2].split('|')[1:5] for run in (first, second)]
  assert rows[0] == rows[1]  # model, top-1, top-5, GFLOPs

  # --verbosity=1 shows orbax's lines again.
  verbose = run_main(tmp_path / 'run', *cache, '--verbosity=1')
  assert 'checkpoint_manager.py' in verbose.stderr
  assert cache_use(verbose.stderr) == (programs, 0)


def test_auto_cache_dir_paths_and_the_progress_bar(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  before = (
    jax.config.jax_compilation_cache_dir,
    jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  try:
    assert runtime.enable_compile_cache('auto') == str(tmp_path / 'ats_jax' / 'xla')
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'ats_jax' / 'xla')
    assert runtime.enable_compile_cache('') is None
  finally:
    jax.config.update('jax_compilation_cache_dir', before[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', before[1])
  assert runtime.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert runtime.absolute('run') == str(tmp_path.cwd() / 'run')
  monkeypatch.setattr(runtime, 'is_terminal', lambda stream=None: True)
  for done in range(1, 4):
    progress.eval_progress('ats', done, 3)
  bar = capsys.readouterr().err
  assert bar.count('\r') == 3 and bar.endswith('] 3/3\n') and bar.count('\n') == 1
  monkeypatch.setattr(runtime, 'is_terminal', lambda stream=None: False)
  for done in range(1, 50):
    progress.eval_progress('ats', done, 49)
  lines = capsys.readouterr().err.splitlines()
  assert lines == [
    'eval ats 13/49 batches',
    'eval ats 25/49 batches',
    'eval ats 37/49 batches',
    'eval ats 49/49 batches',
  ]
