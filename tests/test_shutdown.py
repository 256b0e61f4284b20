"""Processes end when their work ends: no tf.data iterator left for interpreter teardown to wait on.

An iterator whose worker threads run Python (`tf.numpy_function`, PIL) hung the interpreter's
teardown forever; the input pipeline now closes its iterators while the interpreter runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
from PIL import Image

from ats_jax.training import checkpointing
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = helpers.ENV | {'PYTHONPATH': ROOT}


def photo_folder(root, per_class: int = 24) -> None:
  """ImageNet-sized JPEGs: each decode and RandAugment keeps a worker in Python a while."""
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for name in ('a', 'b'):
      os.makedirs(root / split / name)
      for i in range(per_class):
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name / f'{i}.jpg', quality=90)


def test_a_script_taking_a_few_batches_from_a_jpeg_folder_exits(tmp_path):
  photo_folder(tmp_path / 'photos')
  script = textwrap.dedent(f"""
    from configs import default
    from ats_jax.data import input_pipeline
    config = default.get_config()
    config.data.name, config.data.data_dir = 'folder', {str(tmp_path / 'photos')!r}
    config.data.eval_split = 'val'
    config.batch_size, config.eval_batch_size, config.aug.repeats = 16, 8, 1
    train = input_pipeline.train_batches(config, image_size=224)
    evaluation = input_pipeline.eval_batches(config, image_size=224)
    shapes = [next(train)['image'].shape for _ in range(3)] + [next(evaluation)['image'].shape]
    print(shapes)
  """)
  start = time.monotonic()
  proc = subprocess.run(
    [sys.executable, '-c', script], capture_output=True, text=True, timeout=30, env=ENV, cwd=ROOT
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == str([(16, 224, 224, 3)] * 3 + [(8, 224, 224, 3)])
  assert time.monotonic() - start < 30


def run_timed(
  args: list[str],
  until: str,
  signal_at: str | None = None,
  signals: tuple[int, ...] = (signal.SIGTERM,),
  returncode: int = 0,
  timeout: float = 300,
) -> tuple[float, str]:
  """Runs main.py; returns (seconds from the last line containing `until` to the exit, output).
  With `signal_at`, sends `signals` once a line contains it. A run still going after `timeout` s
  gets SIGABRT, so the failure shows where each of its threads was (faulthandler)."""
  proc = subprocess.Popen(
    [sys.executable, 'main.py', *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env={**ENV, 'PYTHONFAULTHANDLER': '1'},
    cwd=ROOT,
  )
  watchdog = threading.Timer(timeout, proc.send_signal, [signal.SIGABRT])
  watchdog.start()
  lines, seen = [], None
  try:
    for line in proc.stdout:
      lines.append(line)
      if until in line:
        seen = time.monotonic()
      if signal_at and signal_at in line:
        for signum in signals:
          proc.send_signal(signum)
          time.sleep(0.2)  # each its own notice
        signal_at = None
    proc.wait(timeout=60)
  finally:
    watchdog.cancel()
    proc.kill()
  output = ''.join(lines)
  assert proc.returncode == returncode, output[-8000:]
  assert seen is not None, output[-3000:]
  return time.monotonic() - seen, output


# A 2-block digits model: the same pipeline and loop as `make demo`, compiled in seconds.
SHORT = [
  '--config=configs/digits_ats.py',
  '--config.model_overrides.depth=2',
  '--config.ats_blocks=(1,)',
  '--config.compile_cache_dir=',
  '--config.demo_speed=False',
]


# The bound on a process's end after its last line. The hangs this file guards against took 20 s to
# forever; a clean exit takes 3.3-3.9 s alone on the 2-core AVX2 machine (about 2.8 s of it the
# interpreter's and the native libraries' teardown after atexit) and up to 5.4 s beside another
# pytest-xdist worker, so 5 s failed there without a defect.
EXIT_SECONDS = 10


def test_digits_training_exits_soon_after_its_last_evaluation(tmp_path):
  seconds, output = run_timed(
    [*SHORT, f'--workdir={tmp_path}', '--config.num_steps=30'], until='eval_dense/top1'
  )
  assert '| dense |' in output
  assert seconds < EXIT_SECONDS, output[-2000:]


def test_sigterm_saves_and_exits_soon(tmp_path):
  seconds, output = run_timed(
    [*SHORT, f'--workdir={tmp_path}', '--config.num_steps=100000'],
    until='after SIGTERM',
    signal_at='Training 100000 steps',
    returncode=checkpointing.EXIT_SAVED,
  )
  assert 'rerun the same command to resume' in output
  assert seconds < EXIT_SECONDS, output[-2000:]


def test_ctrl_c_saves_exits_without_a_traceback_and_the_rerun_resumes(tmp_path):
  run = [*SHORT, f'--workdir={tmp_path}', '--config.num_steps=100000']
  _, output = run_timed(
    run,
    until='after Ctrl-C (SIGINT)',
    signal_at='Training 100000 steps',
    signals=(signal.SIGINT,),
    returncode=checkpointing.EXIT_SAVED,
  )
  assert 'Traceback' not in output and 'KeyboardInterrupt' not in output, output[-3000:]
  steps = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and steps[0] >= 1  # the step the signal reached
  _, output = run_timed(
    run,
    until='after SIGTERM',
    signal_at=f'from step {steps[0]}',
    returncode=checkpointing.EXIT_SAVED,
  )
  assert f'Resuming from {tmp_path}, step {steps[0]}' in output


def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path):
  seconds, output = run_timed(
    [*SHORT, f'--workdir={tmp_path}', '--config.num_steps=100000'],
    until='Training 100000 steps',
    signal_at='Training 100000 steps',
    signals=(signal.SIGINT, signal.SIGINT),
    returncode=checkpointing.EXIT_INTERRUPTED,
  )
  assert output.rstrip().endswith('A second Ctrl-C: stopped at once, without saving.'), output
  assert 'Traceback' not in output
  assert seconds < EXIT_SECONDS  # mid-compile: the process does not wait for the first step
  assert not list((tmp_path / 'checkpoints').glob('[0-9]*'))
