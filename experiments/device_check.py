"""One command for an accelerator: parity with timm, ATS's numbers, speed and training.

  python -m experiments.device_check --out=experiments/results   # one GPU: a few minutes
  python -m experiments.device_check --small                     # any CPU: tiny sizes (the tests)

Checks, on the default device: our dense DeiT-S against timm's on the same weights (float32,
highest matmul precision); ATS packed and budgeted against padded (same kept tokens, same logits);
bfloat16 against float32 (kept tokens per block, top-1). Then times dense, ATS packed, padded and
budgeted, and timm (bf16 autocast) on real photos, and a few ATS training steps in each execution
(budgeted through `BudgetRunner`: calibrated on its first step, overflowed steps re-run). Writes
`benchmark_<device>.md` under --out. Weights are random with q and k scaled (--peak), so attention
is as sharp as a trained model's and ATS keeps a realistic share of the tokens.
"""

from __future__ import annotations

import functools
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from absl import app, flags
from flax import nnx

from ats_jax.layout.budgets import BudgetRunner
from ats_jax.models import vit
from experiments import benchmark, photos

_OUT = flags.DEFINE_string('out', None, 'Folder for benchmark_<device>.md; None: print only.')
_SMALL = flags.DEFINE_bool(
  'small', False, 'DeiT-Ti cut to 4 blocks (ATS in 1-3), batch 2, 1 round: a check of the check.'
)
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 5, 'Timed ATS training steps per execution.')


def parity(name: str, images: np.ndarray, peak: float, depth: int | None = None) -> list[str]:
  """Dense against timm, packed against padded, bf16 against f32: one line each."""
  reference = benchmark.random_timm(name, peak, depth)
  blocks = benchmark.ats_blocks(len(reference.blocks))
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    expected = reference.to(device)(x).float().cpu().numpy()
  reference = reference.cpu()
  x = jnp.asarray(images)
  results, streams = {}, {}
  for key, options in {
    'dense': {},
    'packed': dict(ats_blocks=blocks, execution='packed'),
    'padded': dict(ats_blocks=blocks, execution='padded'),
    'budgeted': dict(ats_blocks=blocks, execution='budgeted'),
    'bf16': dict(ats_blocks=blocks, execution='packed', dtype=jnp.bfloat16),
  }.items():
    model = benchmark.flax_twin(reference, name, **options)
    if key == 'budgeted':  # budgets from padded's counts of this batch
      benchmark.with_budgets(model, streams['padded'], len(images))
    with jax.default_matmul_precision('highest' if key != 'bf16' else 'default'):
      logits, stats = jax.jit(lambda m, x: m(x, return_stats=True))(model, x)  # noqa: B023
    results[key] = (np.asarray(logits), np.asarray(stats['kept_tokens']))
    streams[key] = stats['stream_tokens']
  dense, packed, padded, budgeted, bf16 = (
    results[k] for k in ('dense', 'packed', 'padded', 'budgeted', 'bf16')
  )
  kept_f32, kept_bf16 = packed[1].mean(0), bf16[1].mean(0)
  apart = 100 * np.max(np.abs(kept_bf16 / kept_f32 - 1))
  return [
    f'dense vs timm (float32): max |logit diff| {np.abs(dense[0] - expected).max():.2e}',
    f'ATS packed vs padded: kept tokens equal: {bool((packed[1] == padded[1]).all())}, '
    f'max |logit diff| {np.abs(packed[0] - padded[0]).max():.2e}',
    f'ATS budgeted vs padded: kept tokens equal: {bool((budgeted[1] == padded[1]).all())}, '
    f'max |logit diff| {np.abs(budgeted[0] - padded[0]).max():.2e}',
    f'ATS bf16 vs f32: worst block mean kept tokens {apart:.2f}%'
    f' apart, same top-1 on {100 * np.mean(bf16[0].argmax(-1) == packed[0].argmax(-1)):.1f}%',
    f'mean kept tokens per block (f32): {kept_f32.round(1).tolist()}',
  ]


def train_steps(
  name: str, batch: int, steps: int, dtype: str, depth: int | None = None
) -> list[str]:
  """Seconds per ATS training step (grad of the loss + AdamW) in each execution; a budgeted step
  that overflowed keeps its old state and is re-run padded by the runner."""
  images = jnp.asarray(photos.photos(batch))
  labels = jnp.arange(batch) % 1000
  lines = []
  reference = benchmark.random_timm(name, 4.0, depth)
  tx = optax.adamw(1e-4)
  for execution in ('packed', 'padded', 'budgeted'):
    model = benchmark.flax_twin(
      reference, name, ats_blocks=benchmark.ats_blocks(len(reference.blocks)),
      execution=execution, dtype=jnp.dtype(dtype), drop_path_rate=0.1,
    )  # fmt: skip
    runner = BudgetRunner.for_model(model, batch)
    graphdef, params = nnx.split(model)
    steps_of = {}

    def step_fn(execution, graphdef=graphdef, params=params, steps_of=steps_of):
      if execution not in steps_of:
        steps_of[execution] = jax.jit(
          functools.partial(_train_step, vit.with_execution(graphdef, params, execution), tx)
        )
      return steps_of[execution]

    carry = (params, tx.init(params))

    def call(execution, carry, i):
      return step_fn(execution)(*carry, images, labels, jax.random.key(i))

    def report(out):
      return out[3], out[4]

    start = time.perf_counter()
    out = jax.block_until_ready(runner.run(functools.partial(call, i=0), carry, report, _carry))
    compile_s = time.perf_counter() - start
    losses, start = [], time.perf_counter()
    for i in range(steps):
      out = runner.run(functools.partial(call, i=i + 1), _carry(out), report, _carry)
      losses.append(float(out[2]))
    seconds = (time.perf_counter() - start) / steps
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get('peak_bytes_in_use', 0) / 2**30
    budgets = (f', budgets {runner.budgets}, use {100 * runner.use():.0f}%, re-runs '
               f'{runner.reruns}, programs {runner.programs}') if runner.active else ''  # fmt: skip
    lines.append(
      f'train {execution}: batch {batch} {dtype}, {1e3 * seconds:.1f} ms/step '
      f'({batch / seconds:.0f} images/s), compile {compile_s:.1f} s, loss {losses[0]:.3f} -> '
      f'{losses[-1]:.3f}, peak device memory so far {peak:.2f} GiB{budgets}'
    )
  return lines


def _train_step(graphdef, tx, params, opt_state, images, labels, rng):
  """One AdamW step; where a token budget overflowed, the old state (the runner re-runs it)."""

  def loss_fn(params):
    logits, stats = nnx.merge(graphdef, params)(images, return_stats=True, rng=rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), stats

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new = (optax.apply_updates(params, updates), new_opt_state)
  kept = jax.tree.map(lambda n, o: jnp.where(stats['overflow'], o, n), new, (params, opt_state))
  return *kept, loss, stats['overflow'], stats['stream_tokens']


def _carry(out):
  return out[0], out[1]


def main(argv: list[str]) -> None:
  del argv
  small = _SMALL.value
  name = 'deit_tiny_patch16_224' if small else 'deit_small_patch16_224'
  depth = 4 if small else None  # the variant's 12
  peak = 4.0
  batches, repeats = ((2,), 1) if small else ((1, 64, 256), 5)
  dtype = 'float32' if small else 'bfloat16'
  flags.FLAGS.images, flags.FLAGS.peak, flags.FLAGS.dtype = 'photos', peak, dtype
  lines = [benchmark.describe_machine(), '']
  if depth:
    lines += [f'{name} cut to its first {depth} blocks (--small)']
  lines += parity(name, photos.photos(4 if small else 32), peak, depth)
  rows = []
  for batch in batches:
    rows += benchmark.bench_model(name, batch, repeats, peak, dtype, depth)
  lines += ['', benchmark.table(rows), '']
  steps = 2 if small else _TRAIN_STEPS.value
  lines += train_steps(name, 4 if small else 128, steps, dtype, depth)
  report = '\n'.join(lines)
  print(report)
  if _OUT.value:
    device = re.sub(r'[^a-z0-9]+', '_', jax.devices()[0].device_kind.lower()).strip('_')
    path = os.path.join(_OUT.value, f'benchmark_{device}.md')
    with open(path, 'w') as f:
      f.write(f'# `python -m experiments.device_check`\n\n```\n{report}\n```\n')
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
