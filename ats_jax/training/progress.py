"""What a long run tells its user: compiles announced and kept out of every rate, steps/s and ETA
measured on finished work, evaluation progress by model.

Rates are taken at points where the host has waited for the device (the metrics fetched at a log
step), never at a dispatch: JAX dispatches steps asynchronously, so a rate taken at dispatch
counts steps the device has not run (84 steps/s reported for 0.5 measured, before this).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Hashable

import jax
from absl import logging

from ats_jax.training import runtime


class Compiled:
  """A step compiled ahead of its first call, once per key (a layout), with a log line before and
  after: a minute of silence gets a reason, and a timed call never includes a compile. A key seen
  again, here or in an earlier instance, comes from JAX's in-memory cache in microseconds."""

  def __init__(self, jitted: Callable[[Hashable], Callable], what: str):
    self._jitted, self._what, self._compiled = jitted, what, {}
    self.seconds = 0.0  # spent compiling: what a timed call subtracts

  @property
  def compiles(self) -> int:
    """Programs compiled so far."""
    return len(self._compiled)

  def __call__(self, key: Hashable, *args):
    if key not in self._compiled:
      logging.info('Compiling %s ...', self._what)
      start = time.perf_counter()
      self._compiled[key] = self._jitted(key).lower(*args).compile()
      seconds = time.perf_counter() - start
      self.seconds += seconds
      logging.info('Compiled %s in %.1f s', self._what, seconds)
    return self._compiled[key](*args)


class Throughput:
  """Steps/s and ETA of a training run from `start`, measured when the caller has synchronised
  with the device (`at`), excluding what came before `begin` (compilation)."""

  def __init__(self, total: int):
    self.total = total
    self._since: tuple[int, float] | None = None

  def begin(self, step: int) -> None:
    """Steps after `step` count: call it once the first step's program is compiled."""
    self._since = (step, time.perf_counter())

  def at(self, step: int) -> float | None:
    """Steps/s from `begin` to `step`, whose results the host holds; None before any step ran."""
    if self._since is None or step <= self._since[0]:
      return None
    first, start = self._since
    return (step - first) / max(time.perf_counter() - start, 1e-9)

  def line(self, step: int) -> str:
    rate = self.at(step)
    if rate is None:
      return f'step {step}/{self.total}'
    eta = round((self.total - step) / rate)
    hours, minutes = eta // 3600, eta % 3600 // 60
    return f'step {step}/{self.total}: {rate:.3g} steps/s, ETA {hours}h{minutes:02d}m'


def eval_progress(name: str, done: int, total: int) -> None:
  """Evaluation progress of model `name` on stderr (host 0 only): a bar redrawn in place on a
  terminal; in a log file a plain line at each quarter."""
  if jax.process_index():
    return
  if not runtime.is_terminal():
    if (4 * done) // total > (4 * (done - 1)) // total:
      sys.stderr.write(f'eval {name} {done}/{total} batches\n')
      sys.stderr.flush()
    return
  width = 30
  filled = int(width * min(done, total) / max(total, 1))
  end = '\n' if done >= total else ''
  bar = f'[{"#" * filled}{"." * (width - filled)}]'
  sys.stderr.write(f'\reval {name} {bar} {done}/{total}{end}')
  sys.stderr.flush()
