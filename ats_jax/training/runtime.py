"""The process around the model: quiet logs, JAX's persistent compilation cache and multi-host
start-up. Used by `main.py` and `python -m ats_jax.predict`."""

from __future__ import annotations

import collections
import logging as std_logging
import os
import sys

import jax
from absl import logging

DISTRIBUTED = ('auto', 'on', 'off')
# Environment variables of the cluster launchers `jax.distributed.initialize()` auto-detects.
CLUSTER_VARIABLES = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES')
# JAX's monitoring events: one backend-compile duration per program that reaches XLA, whether
# compiled or loaded from the persistent cache; a cache hit per program loaded. (JAX's
# '/jax/compilation_cache/cache_misses' counts cache writes only, not programs compiled.)
CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
cache_counts: collections.Counter = collections.Counter()  # 'programs', 'hits'
_OWN_PATHS = (
  os.path.dirname(os.path.abspath(__file__)),  # ats_jax
  os.sep + 'clu' + os.sep,  # metrics, steps/s and ETA
)


def quiet_native_logs(verbose: bool) -> None:
  """TensorFlow's C++ start-up lines (oneDNN notices, absl::InitializeLog warnings) off unless
  `verbose`: TensorFlow is imported (`import_tensorflow`) with the process's stderr closed, and its
  INFO lines are off.

  Python errors still show (they are raised after stderr is back). An explicit
  TF_CPP_MIN_LOG_LEVEL wins.
  """
  if 'tensorflow' in sys.modules:
    return
  if verbose:
    import_tensorflow()
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import_tensorflow()  # its oneDNN notice ignores TF_CPP_MIN_LOG_LEVEL
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tensorflow() -> None:
  """Imports TensorFlow without the Keras it loads eagerly: Keras, and through it scikit-learn's and
  SciPy's statistics, cost about 3 s of every start, and this project uses only tf.data and
  tf.image. `tf.keras` still loads on first use.

  TensorFlow's `__init__` imports `keras.src.optimizers` inside `except ImportError`; a None entry
  in `sys.modules` makes that import fail at once, and is removed right after.
  """
  if 'tensorflow' in sys.modules:
    return
  block = 'keras' not in sys.modules
  if block:
    sys.modules['keras'] = None
  try:
    import tensorflow  # noqa: F401
  finally:
    if block:
      del sys.modules['keras']


class _OwnInfoOnly(std_logging.Filter):
  """Keeps warnings and errors from everyone, INFO only from this project and clu's writers."""

  def __init__(self, own_paths: tuple[str, ...]):
    super().__init__()
    self.own_paths = own_paths

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING or logging.get_verbosity() > logging.INFO:
      return True
    return any(p in record.pathname for p in self.own_paths)


def quiet_library_logs(*own_paths: str) -> None:
  """Orbax's, JAX's and TensorFlow's INFO lines off at the default verbosity (`-v 1` shows them);
  `own_paths` (files or folders) keep theirs."""
  handler = logging.get_absl_handler()
  handler.filters = [f for f in handler.filters if not isinstance(f, _OwnInfoOnly)]
  handler.addFilter(_OwnInfoOnly(_OWN_PATHS + tuple(own_paths)))


def absolute(path: str) -> str:
  """A local path made absolute (orbax requires it); a URL such as gs://bucket/run kept as is."""
  return path if '://' in path else os.path.abspath(path)


def default_cache_dir() -> str:
  """$XDG_CACHE_HOME/ats_jax/xla, else ~/.cache/ats_jax/xla: shared by every run of the user."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'ats_jax', 'xla')


def enable_compile_cache(directory: str, min_compile_secs: float = 0.0) -> str | None:
  """JAX's persistent compilation cache in `directory` ('auto': `default_cache_dir()`; '': off):
  a second run of the same program loads its executables instead of compiling them. Programs
  that compile faster than `min_compile_secs` are not stored. Returns the directory used."""
  if not directory:
    return None
  directory = default_cache_dir() if directory == 'auto' else absolute(directory)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float(min_compile_secs))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  if not cache_counts:  # the listeners, once per process
    jax.monitoring.register_event_listener(_count_hit)
    jax.monitoring.register_event_duration_secs_listener(_count_program)
    cache_counts.update(programs=0, hits=0)
  return directory


def _count_hit(event: str, **kwargs) -> None:
  del kwargs
  if event == CACHE_HIT_EVENT:
    cache_counts['hits'] += 1


def _count_program(event: str, duration: float, **kwargs) -> None:
  del duration, kwargs
  if event == BACKEND_COMPILE_EVENT:
    cache_counts['programs'] += 1


def log_cache_use(directory: str | None) -> None:
  """One line: how many programs came from the persistent cache and how many were compiled."""
  if directory:
    hits = cache_counts['hits']
    logging.info(
      'Compilation cache %s: %d programs loaded, %d compiled',
      directory,
      hits,
      cache_counts['programs'] - hits,
    )


def initialize_distributed(mode: str, environ: dict | None = None) -> bool:
  """`jax.distributed.initialize()` when `mode` says so: 'on' always (TPU pod slices, any
  launcher JAX detects), 'off' never, 'auto' under Slurm, Open MPI, a TPU pod or an explicit
  JAX_COORDINATOR_ADDRESS. Returns whether it initialised."""
  if mode not in DISTRIBUTED:
    raise ValueError(f'config.distributed={mode!r} is not one of {DISTRIBUTED}')
  environ = os.environ if environ is None else environ
  detected = any(v in environ for v in (*CLUSTER_VARIABLES, 'JAX_COORDINATOR_ADDRESS'))
  if mode == 'on' or (mode == 'auto' and detected):
    jax.distributed.initialize()
    return True
  return False


def is_terminal(stream=None) -> bool:
  """Whether `stream` (default stderr) is a terminal: only there may a progress bar redraw."""
  stream = sys.stderr if stream is None else stream
  return hasattr(stream, 'isatty') and stream.isatty()
