"""What a run tells its user: rates over finished work only, compiles announced and not timed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from ats_jax.training import progress


class Clock:
  """A `time.perf_counter` that moves only when told."""

  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


def test_steps_per_second_count_from_the_end_of_compilation(monkeypatch):
  """4 steps after a 42 s compile at 2 s each: 0.5 steps/s, not 4 / (42 + 8 s), nor the dispatch
  rate of steps the device has not run (84 steps/s was reported for 0.5 measured)."""
  clock = Clock()
  monkeypatch.setattr(progress.time, 'perf_counter', clock)
  throughput = progress.Throughput(total=10)
  assert throughput.at(3) is None and throughput.line(3) == 'step 3/10'
  clock.now += 42.0  # compiling the first step
  throughput.begin(0)
  clock.now += 8.0  # the host waited for 4 steps' metrics
  assert throughput.at(4) == pytest.approx(0.5)
  assert throughput.line(4) == 'step 4/10: 0.5 steps/s, ETA 0h00m'
  clock.now += 7200.0 - 8.0
  assert throughput.line(4) == 'step 4/10: 0.000556 steps/s, ETA 3h00m'


def test_a_compiled_step_compiles_once_per_key_and_keeps_its_time_apart(monkeypatch):
  lines = []
  monkeypatch.setattr(progress.logging, 'info', lambda fmt, *args: lines.append(fmt % args))
  jitted = {'double': jax.jit(lambda x: 2 * x), 'square': jax.jit(lambda x: x * x)}
  step = progress.Compiled(jitted.__getitem__, 'the step')
  x = jnp.arange(3.0)
  assert step('double', x).tolist() == [0.0, 2.0, 4.0]
  assert step('double', x + 1).tolist() == [2.0, 4.0, 6.0]
  assert step.compiles == 1 and step.seconds > 0
  assert lines[0] == 'Compiling the step ...' and lines[1].startswith('Compiled the step in ')
  assert step('square', x).tolist() == [0.0, 1.0, 4.0]
  assert step.compiles == 2 and len(lines) == 4
