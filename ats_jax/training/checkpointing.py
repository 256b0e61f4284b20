"""Orbax checkpoints of the train state, and preemption: SIGTERM saves before the process exits."""

from __future__ import annotations

import os
import signal

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ats_jax.training import runtime


class Checkpointer:
  """Keeps the last `keep` train states under `directory` (made absolute, as orbax requires; a
  gs:// bucket works too)."""

  def __init__(self, directory: str | os.PathLike, keep: int):
    self.manager = ocp.CheckpointManager(
      runtime.absolute(str(directory)), options=ocp.CheckpointManagerOptions(max_to_keep=keep)
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state) -> None:
    """Starts an asynchronous save; training goes on while it is written."""
    logging.info('Saving checkpoint %d to %s', step, self.manager.directory)
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, abstract_state, step: int | None = None):
    """The state at `step` (default: latest), laid out as `abstract_state`'s shardings say."""
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def close(self) -> None:
    """Waits for pending saves: nothing is lost when the process ends right after."""
    self.manager.wait_until_finished()
    self.manager.close()


class Preemption:
  """Notices SIGTERM (a cluster's preemption notice): training saves at the next step and exits.

  The handler only sets a flag: it runs wherever the main thread happens to be, and anything more
  (a log line) can raise there, be swallowed by that code's own error handling and lose the
  notice. On several hosts JAX's own preemption sync point makes every host agree on the same step.
  """

  def __init__(self):
    self.requested = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    if self.requested:  # the loop saves and returns at this step
      logging.warning('SIGTERM: saving a checkpoint at step %d, then exiting', step)
    return self.requested
