"""ATS executions and their settings timed against each other on one device (a lent GPU), in bf16.

  python -m experiments.gpu_executions --json=/tmp/gpu.json \
    --plan='256:dense+padded, both off+padded, loops+padded+packed 8' --plan='8:dense+padded'

Each `--plan` entry is `batch:variant+variant+...` (names in `VARIANTS`): DeiT-S, ATS in blocks 3-11
(cap 197), random weights with q and k x4, real photos. Every variant is compiled and timed on its
own as it comes (a row printed, the JSON rewritten: nothing is lost if the run is cut short), then
the batch's rows and timm's model (bf16 autocast) are timed in alternation, best of 10. Each ATS
row is also compared with the batch's first ATS row: top-1 agreement, largest logit difference and
the share of (image, block) kept-token counts that are equal.

Besides the executions, variants switch off two choices made for GPUs, as they were before them:
the masked attention handed to cuDNN (`ats_jax.backend.attention_implementation`) and the binary
searches of the sampling unrolled (`Execution.search`); on a CPU neither is used. 'budgeted' takes
its budgets from a padded run's counts of the same batch, as `BudgetRunner` does on its first
batch, and its row gives them with their use and whether it overflowed.
"""

from __future__ import annotations

import contextlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ats_jax import layout
from ats_jax.ops import attention
from experiments import benchmark, photos

_PLAN = flags.DEFINE_multi_string('plan', ['256:dense+padded+packed 8'], 'batch:variant+...')
_MODEL = flags.DEFINE_string('model', 'deit_small_patch16_224', 'Registered variant.')
_DEPTH = flags.DEFINE_integer('depth', None, "Blocks (None: the variant's); ATS from depth / 4 on.")

_FUSED = attention.fused_attention


def _xla_masked_attention(q, k, v, mask=None):
  """`fused_attention` as it was: cuDNN for unmasked attention only."""
  return _FUSED(q, k, v) if mask is None else attention.softmax_attention(q, k, v, mask)


_XLA_ATTENTION = {(attention, 'fused_attention'): _xla_masked_attention}
VARIANTS = {  # name: (execution mode and fields, or None: dense; module attributes while tracing)
  'dense': (None, {}),
  'padded': (('padded', {}), {}),
  'padded, XLA attention': (('padded', {}), _XLA_ATTENTION),
  'padded, loops': (('padded', dict(search='scan')), {}),
  'padded, both off': (('padded', dict(search='scan')), _XLA_ATTENTION),
  'packed': (('packed', {}), {}),
  'packed 8': (('packed', dict(pack_chunks=8, align=256, attention_group=64)), {}),
  'packed 4': (
    ('packed', dict(pack_chunks=4, attention_sizes=4, align=1024, attention_group=256)),
    {},
  ),
  'budgeted': (('budgeted', {}), {}),
}


@contextlib.contextmanager
def _patched(values: dict):
  saved = {key: getattr(*key) for key in values}
  for (module, name), value in values.items():
    setattr(module, name, value)
  try:
    yield
  finally:
    for (module, name), value in saved.items():
      setattr(module, name, value)


def _time(run) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def bench(batch: int, names: list[str], reference, rows: list[dict], out: str | None) -> None:
  """Appends the batch's rows (one per variant, then timm's) to `rows`, writing `out` as it goes."""
  images = photos.photos(batch)
  x = jnp.asarray(images)
  runners, outputs, first = {}, {}, None
  for name in names:
    execution, values = VARIANTS[name]
    start = time.perf_counter()
    options = dict(dtype=jnp.bfloat16)
    mode, fields = execution or (None, {})
    if execution is not None:
      options |= dict(execution=layout.resolve(mode, **fields),
                      ats_blocks=benchmark.ats_blocks(len(reference.blocks)))  # fmt: skip
    with _patched(values):  # traced (and compiled) under the variant's settings
      model = benchmark.flax_twin(reference, _MODEL.value, **options)
      if mode == 'budgeted':
        runner = benchmark.with_budgets(model, padded_streams(reference, x), batch)
      graphdef, state = nnx.split(model)
      forward = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x, return_stats=True))
      logits, stats = jax.device_get(forward(state, x))
    runners[name] = lambda f=forward, s=state: jax.block_until_ready(f(s, x))
    row = dict(batch=batch, impl=name, compile_s=time.perf_counter() - start,
               alone_ms=1e3 * min(_time(runners[name]) for _ in range(5)),
               gflops=float(np.mean(stats['gflops'])),
               kept_tokens=float(np.mean(stats['kept_tokens'])))  # fmt: skip
    outputs[name] = np.asarray(logits, np.float32), np.asarray(stats['kept_tokens'])
    if mode == 'budgeted':
      row |= dict(budgets=runner.budgets, overflow=bool(stats['overflow']))
      runner.observe(stats['stream_tokens'], bool(stats['overflow']))
      row['budget_use'] = runner.use()
    if execution is not None:
      first = first or name
      (a, kept_a), (b, kept_b) = outputs[first], outputs[name]
      row |= dict(vs=first, top1_agree=float(np.mean(a.argmax(-1) == b.argmax(-1))),
                  max_logit_diff=float(np.abs(a - b).max()),
                  kept_equal=float(np.mean(kept_a == kept_b)))  # fmt: skip
    print(json.dumps(row), flush=True)
    rows.append(row)
    _write(out, rows)
  runners['timm'] = benchmark.torch_runner(reference, images, 'bfloat16')
  runners['timm']()  # warm-up
  best = dict.fromkeys(runners, float('inf'))
  for _ in range(10):
    for name, run in runners.items():  # alternated
      best[name] = min(best[name], _time(run))
  rows.append(dict(batch=batch, impl='timm'))
  for row in rows[-len(runners) :]:
    row |= dict(ms=1e3 * best[row['impl']], speedup=best[names[0]] / best[row['impl']])
  print(json.dumps(rows[-len(runners) :]), flush=True)
  _write(out, rows)


def padded_streams(reference, x: jax.Array) -> np.ndarray:
  """Per block, the real tokens of the batch `x` in padded execution: what budgets must hold."""
  model = benchmark.flax_twin(reference, _MODEL.value, dtype=jnp.bfloat16, execution='padded',
                              ats_blocks=benchmark.ats_blocks(len(reference.blocks)))  # fmt: skip
  return np.asarray(nnx.jit(lambda m, x: m(x, return_stats=True))(model, x)[1]['stream_tokens'])


def _write(out: str | None, rows: list[dict]) -> None:
  if out:
    with open(out, 'w') as f:
      json.dump(dict(machine=benchmark.describe_machine(), rows=rows), f, indent=1)


def main(argv: list[str]) -> None:
  del argv
  flags.FLAGS.peak, flags.FLAGS.dtype = 4.0, 'bfloat16'  # for describe_machine
  reference = benchmark.random_timm(_MODEL.value, 4.0, _DEPTH.value)
  rows = []
  for entry in _PLAN.value:
    batch, names = entry.split(':')
    bench(int(batch), names.split('+'), reference, rows, flags.FLAGS.json)  # benchmark's flag


if __name__ == '__main__':
  app.run(main)
