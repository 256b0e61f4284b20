"""Orbax checkpoints of the train state, and stopping on request: SIGTERM or Ctrl-C saves before
the process exits."""

from __future__ import annotations

import os
import signal

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ats_jax.training import runtime

EXIT_SAVED = 75  # stopped on request after saving: rerun the same command to resume (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # stopped at once by a second Ctrl-C (128 + SIGINT, as a shell reports it)
SIGNAL_NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C (SIGINT)'}


class Checkpointer:
  """Keeps the last `keep` train states under `directory` (made absolute, as orbax requires; a
  gs:// bucket works too)."""

  def __init__(self, directory: str | os.PathLike, keep: int):
    self.manager = ocp.CheckpointManager(
      runtime.absolute(str(directory)),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep),
      item_handlers=ocp.StandardCheckpointHandler(),  # so that metadata can be read
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def shape(self, name: str, step: int | None = None) -> tuple[int, ...]:
    """The shape of array `name` ('params.head.bias') in the state at `step` (default: latest),
    read from the checkpoint's metadata without restoring anything."""
    node = self.manager.item_metadata(self.latest_step() if step is None else step)
    for key in name.split('.'):
      node = node[key]
    return tuple(node['value'].shape)

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
  """Notices a request to stop: SIGTERM (a cluster's preemption notice) or a first Ctrl-C. Training
  saves at the next step boundary and exits with `EXIT_SAVED`; a second Ctrl-C exits at once with
  `EXIT_INTERRUPTED`, losing the steps since the last checkpoint.

  The handlers only set a flag: they run wherever the main thread happens to be, and anything more
  (a log line) can raise there, be swallowed by that code's own error handling and lose the
  notice. On several hosts JAX's own preemption sync point makes every host agree on the same step
  (Ctrl-C there stops the host it reaches, as usual).
  """

  def __init__(self):
    self.requested: str | None = None  # what asked, for the log line
    self._previous = {}

  def __enter__(self) -> Preemption:
    if jax.process_count() == 1:
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.requested:
      os.write(2, b'A second Ctrl-C: stopped at once, without saving.\n')  # a handler may not log
      os._exit(EXIT_INTERRUPTED)
    self.requested = SIGNAL_NAMES[signum]

  def reached(self, step: int) -> str | None:
    """What asked to stop at `step` (the loop saves and returns), or None to go on."""
    if jax.process_count() > 1:
      return 'a preemption notice' if multihost_utils.reached_preemption_sync_point(step) else None
    if self.requested:
      logging.warning('%s: saving a checkpoint at step %d, then exiting', self.requested, step)
    return self.requested
