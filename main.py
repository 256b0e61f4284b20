"""Entry point: `python main.py --config=configs/deit_s_ats.py --workdir=DIR [--config.x=value]`.

Modes (`config.mode`): 'train' (resumes from DIR's latest checkpoint, then evaluates), 'evaluate'
(`config.checkpoint`, else DIR's latest checkpoint), 'describe' (the zoo, one timed forward pass).
Exit status: 0 done; 1 an `error:` line; 75 training stopped by SIGTERM or Ctrl-C after saving a
checkpoint (the same command resumes); 130 stopped at once by a second Ctrl-C (or a Ctrl-C outside
the training loop), unsaved.
On several hosts run the same command on each; `jax.distributed.initialize()` finds the others
(`config.distributed`). Compiled programs go to JAX's persistent cache (`config.compile_cache_dir`),
so a second start skips compilation. Library INFO logs show with `--verbosity=1`.
"""

from __future__ import annotations

import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from ats_jax.errors import CheckpointError, InputError
from ats_jax.models import create_model, flops, zoo
from ats_jax.training import checkpointing, runtime

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to a config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
MODES = ('train', 'evaluate', 'describe')


def describe(config: ml_collections.ConfigDict) -> None:
  """Prints the zoo, then builds the configured model and times one jitted forward pass."""
  from ats_jax.training import train

  print(zoo.zoo_table(), end='\n\n')
  model = create_model(
    config.model,
    checkpoint=config.checkpoint or None,
    seed=config.seed,
    **train.model_options(config),
  )
  model.eval()
  size = model.img_size
  batch = config.eval_batch_size
  images = jax.random.normal(jax.random.key(config.seed), (batch, size, size, 3))
  forward = nnx.jit(lambda m, x: m(x, return_stats=True))
  start = time.perf_counter()
  logits, stats = jax.block_until_ready(forward(model, images))
  compiled = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(forward(model, images))
  step = time.perf_counter() - start
  kept = np.asarray(stats['kept_tokens']).mean(0)
  print(
    f'{config.model} ({"weights: " + config.checkpoint if config.checkpoint else "random init"},'
    f' {jnp.dtype(model.dtype).name}, ATS blocks {list(config.ats_blocks)})'
    f' on {jax.devices()[0].platform}\n'
    f'  mean kept tokens per block: {" ".join(f"{k:.1f}" for k in kept)}\n'
    f'  GFLOPs/image: {float(np.mean(stats["gflops"])):.2f}'
    f' (dense {flops.dense_gflops(model.spec):.2f})\n'
    f'  compile+run {compiled:.1f}s, then {batch / step:.1f} images/s\n'
    f'  top-1 class of each image {np.asarray(jnp.argmax(logits, -1)).tolist()}'
  )


def print_results(results: dict) -> None:
  """The evaluation as a table on stdout: what a user reads first."""
  print('| model | top-1 | top-5 | GFLOPs/image | mean kept tokens per ATS block | images/s |')
  print('|---|---:|---:|---:|---|---:|')
  for name, r in results.items():
    kept = ' '.join(f'{b}:{k:g}' for b, k in r['kept_tokens'].items()) or '-'
    speed = '-' if r['images_per_sec'] is None else f'{r["images_per_sec"]:.0f}'
    print(
      f'| {name} | {100 * r["top1"]:.2f} | {100 * r["top5"]:.2f} | {r["gflops"]:.4g} | {kept} '
      f'| {speed} |'
    )


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  if config.mode not in MODES:
    sys.exit(f'error: config.mode={config.mode!r} is not one of {MODES}')
  if config.mode == 'train' and not _WORKDIR.value:
    sys.exit('error: training needs --workdir (checkpoints, metrics and results go there)')
  runtime.quiet_native_logs(verbose=flags.FLAGS.verbosity > 0)
  runtime.quiet_library_logs(os.path.abspath(__file__))
  from ats_jax.training import train  # after quieting: they load TensorFlow

  cache = runtime.enable_compile_cache(config.compile_cache_dir, config.compile_cache_min_secs)
  try:
    runtime.initialize_distributed(config.distributed)
    if config.mode == 'describe':
      describe(config)
      return
    workdir = runtime.absolute(_WORKDIR.value) if _WORKDIR.value else None  # or gs://...
    if config.mode == 'train':
      results = train.train_and_evaluate(config, workdir)
    else:
      results = train.evaluate_checkpoint(config, workdir)
  except (CheckpointError, InputError, ValueError) as e:
    sys.exit(f'error: {e}')
  except KeyboardInterrupt:  # outside the training loop, which saves first (Preemption)
    print('Interrupted (Ctrl-C).', file=sys.stderr)
    sys.exit(checkpointing.EXIT_INTERRUPTED)
  runtime.log_cache_use(cache)
  if results is None:  # stopped on request, after saving
    sys.exit(checkpointing.EXIT_SAVED)
  print_results(results)
  if config.get('demo_speed'):  # the digits demo: its model is too small to show ATS's speed
    print_demo_speed()


def print_demo_speed() -> None:
  """Under the demo's table: what its images/s column measures, then ATS's speed where it matters
  (DeiT-S size, `experiments.demo_speed`)."""
  from experiments import demo_speed

  print(
    '\nimages/s above: a 4-block model of 37 tokens, where sampling costs more than the tokens it'
    ' saves; not what ATS is for. Timing a DeiT-S-sized model instead...',
    flush=True,
  )
  print(demo_speed.speed_line(demo_speed.measure()))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad flag or config override reported in one line, not a traceback."""
  try:
    argv = flags.FLAGS(argv)
    _ = _CONFIG.value.mode  # config_flags defers a config file's load error to the first access
    return argv
  except (AttributeError, KeyError) as e:  # ml_collections' word for a field that does not exist
    sys.exit(f'error: {unknown_field_message(e, argv)}')
  except (flags.Error, OSError, TypeError, ValueError) as e:
    sys.exit(f'error: {" ".join(str(e).split())}')


def unknown_field_message(error: Exception, argv: list[str]) -> str:
  """One line for a misspelt `--config.*` field, with ml_collections' suggestion when it has one
  (its KeyError text is the key quoted, then 'Did you mean ...', escaped once more by absl)."""
  text = str(error)
  key = (re.findall(r'\w+', text) or [''])[0]
  overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
  flag = next((f for f in overrides if f.split('.')[-1] == key), f'--config.{key}')
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  hint = f'; did you mean {suggestion[1]!r}?' if suggestion else ''
  return f'{flag} names no config field{hint}'


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=parse_flags)
