"""Inference throughput of ATS against the same weights dense, on real photos, in one run.

For each model and batch size: our Flax model dense, with ATS (the original's setting: blocks 3-11,
cap 197) in packed, padded and budgeted execution, and timm's dense model with the same weights.
Budgeted rows take their budgets from the padded row's counts, as `BudgetRunner` does on its first
batch (8% margin, 128-row multiples), and report them with their use (real tokens / budget rows).
Images are real photos (`experiments.photos`, DeiT's eval transform): noise makes
every image keep the same tokens and hides ATS's real cost. Each row is compiled once, then the
rows are timed in alternation, `--repeats` rounds (each of as many calls as fill `MIN_ROUND_S`); a
row reports its best round's mean call, and its spread: how far its median round lies above that
(the machine's noise; a 2-core cloud VM varied by 20% within a minute).

Speed-up is over our dense model; ideal = dense GFLOPs / the row's mean GFLOPs (what the kept tokens
could buy); efficiency = speed-up / ideal.

  python -m experiments.benchmark --quick              # DeiT-S, batch 1 and 32; a few minutes
  python -m experiments.benchmark --peak=4             # sharper attention: fewer tokens kept
  python -m experiments.benchmark --batch_sizes=1,8,32,128 --json=/tmp/bench.json
  python -m experiments.benchmark --images=noise       # Gaussian noise instead of photos
  python -m experiments.benchmark --batch_sizes=1 --ceiling  # also the bound: static shapes
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch
from absl import app, flags
from flax import nnx

from ats_jax.convert.timm import timm_to_flax
from ats_jax.layout.budgets import BudgetRunner
from ats_jax.models import create_model, flops, vit
from ats_jax.models.factory import load_params
from ats_jax.ops import attention as attention_ops
from experiments import photos


def ats_blocks(depth: int) -> tuple[int, ...]:
  """ATS from a quarter of the depth on: blocks 3-11 at depth 12, the original's DeiT-S setting."""
  return tuple(range(depth // 4, depth))


_MODELS = flags.DEFINE_list('models', ['deit_small_patch16_224'], 'Registered variants.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8', '32', '128'], 'Batch sizes.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed rounds; each row reports its best.')
_PEAK = flags.DEFINE_float('peak', 0.0, 'Scale the q, k kernels (sharper attention); 0 = as is.')
_IMAGES = flags.DEFINE_enum('images', 'photos', ['photos', 'noise'], 'Real photos, or noise.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Computation dtype.')
_TIMM = flags.DEFINE_bool('timm', True, "Also time timm's dense model on the same weights.")
_QUICK = flags.DEFINE_bool('quick', False, 'DeiT-S at batch 1 and 32, 3 rounds.')
_JSON = flags.DEFINE_string('json', None, 'Also write the rows here.')
_CEILING = flags.DEFINE_bool(
  'ceiling',
  False,
  'At batch 1, also time the bound: dense blocks on exactly the token counts ATS '
  'kept, shapes fixed in advance, no sampling.',
)


@dataclasses.dataclass
class Row:
  model: str
  batch: int
  impl: str
  ms_per_batch: float
  compile_s: float
  kept_tokens: float  # mean over blocks and images: tokens entering the MLPs
  gflops: float  # mean per image, at the tokens kept
  images_per_sec: float = 0.0
  speedup: float = 0.0  # over jax dense
  ideal: float = 0.0  # dense GFLOPs / this row's GFLOPs
  efficiency: float = 0.0  # speedup / ideal
  spread: float = 0.0  # the median round over the best, minus 1: how noisy the machine was
  budgets: tuple = ()  # budgeted: rows per block (None: padded)
  budget_use: float = float('nan')  # budgeted: real tokens over budget rows
  reruns: int = 0  # budgeted: batches that overflowed and ran again padded


def random_timm(name: str, peak: float, depth: int | None = None) -> torch.nn.Module:
  """timm's model with random weights (perturbed like the tests), q and k scaled by `peak`;
  `depth` blocks instead of the variant's (a shallow twin for quick checks)."""
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False, **{'depth': depth} if depth else {}).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.02)
    if peak:
      for block in model.blocks:
        dim = block.attn.qkv.in_features
        block.attn.qkv.weight[: 2 * dim] *= peak
  return model


def flax_twin(reference: torch.nn.Module, name: str, **overrides) -> nnx.Module:
  """Our model with `reference`'s weights (and depth), converted by the key table `python -m
  convert` uses."""
  state_dict = {k: v.cpu().numpy() for k, v in reference.state_dict().items()}
  model = create_model(name, **dict(depth=len(reference.blocks)) | overrides)
  expected = {k: v.shape for k, v in vit.param_dict(model).items()}
  load_params(model, timm_to_flax(state_dict, expected, name), name)
  model.eval()
  return model


def jax_runner(model: nnx.Module, images: jax.Array) -> tuple[Callable[[], object], dict, float]:
  """A compiled forward (split once, as in a hot loop), its stats on `images` and the seconds it
  took to trace and compile (no call: at batch 128 a call alone takes seconds)."""
  graphdef, state = nnx.split(model)
  start = time.perf_counter()
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, return_stats=True))
  forward = forward.lower(state, images).compile()
  compile_s = time.perf_counter() - start
  _, stats = forward(state, images)
  return lambda: jax.block_until_ready(forward(state, images)), jax.device_get(stats), compile_s


def static_ceiling(model: nnx.Module, kept: np.ndarray, images: jax.Array) -> Callable[[], object]:
  """One image through `model`'s blocks on exactly `kept` [depth] tokens each (its first ones:
  the same shapes, no sampling, no mask): what any execution of that image's ATS can reach."""
  graphdef, state = nnx.split(model)

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    h = m.embed(x)  # [1, N, C]
    for block, n in zip(m.blocks, kept.tolist(), strict=True):
      qkv = vit._qkv((block.norm1, block.attn.qkv), h)[0]
      q, k, v = (block.attn.heads(t) for t in vit.split_qkv(qkv))
      out = attention_ops.softmax_attention(q[:, :, :n], k, v)
      (h,) = vit._residuals((block.attn.proj, block.norm2, block.mlp), out, h[:, :n])
    return m.head_logits(h)

  forward = jax.jit(forward)
  return lambda: jax.block_until_ready(forward(state, images))


def with_budgets(model: vit.VisionTransformer, streams: np.ndarray, batch: int) -> BudgetRunner:
  """Sets a budgeted model's budgets from a batch's per-block counts (`stats['stream_tokens']`
  of padded execution), as `BudgetRunner` does after its first batch; returns the runner."""
  runner = BudgetRunner.for_model(model, batch)
  runner.observe(np.asarray(streams))
  model.execution = runner.execution
  return runner


def torch_runner(model: torch.nn.Module, images: np.ndarray, dtype: str) -> Callable[[], object]:
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = model.to(device)
  x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous().to(device)
  autocast = torch.autocast(device, torch.bfloat16, enabled=dtype == 'bfloat16')

  def run():
    with torch.inference_mode(), autocast:
      model(x)
    if device == 'cuda':
      torch.cuda.synchronize()

  return run


def make_images(batch: int, kind: str) -> np.ndarray:
  if kind == 'noise':
    return np.random.default_rng(batch).standard_normal((batch, 224, 224, 3), np.float32)
  return photos.photos(batch)


MIN_ROUND_S = 0.25  # a round is as many calls as fill this: one 30 ms call alone is noise-prone


def bench_model(
  name: str, batch: int, repeats: int, peak: float, dtype: str, depth: int | None = None
) -> list[Row]:
  """Compiles every row, then times them in alternation; each row keeps its best round."""
  reference = random_timm(name, peak, depth)
  blocks = ats_blocks(len(reference.blocks))
  images = make_images(batch, _IMAGES.value)
  x = jnp.asarray(images)
  options = dict(dtype=jnp.dtype(dtype))
  models = {
    'jax dense': flax_twin(reference, name, **options),
    'jax ATS packed': flax_twin(reference, name, ats_blocks=blocks, execution='packed', **options),
    'jax ATS padded': flax_twin(reference, name, ats_blocks=blocks, execution='padded', **options),
    'jax ATS budgeted': flax_twin(
      reference, name, ats_blocks=blocks, execution='budgeted', **options
    ),
  }
  runners, rows, streams = {}, {}, {}
  dense = models['jax dense']
  for impl, model in models.items():
    if impl == 'jax ATS budgeted':
      runner = with_budgets(model, streams['jax ATS padded'], batch)
    run, stats, compile_s = jax_runner(model, x)
    kept, gflops = float(np.mean(stats['kept_tokens'])), float(np.mean(stats['gflops']))
    rows[impl] = Row(name, batch, impl, 0.0, compile_s, kept, gflops)
    runners[impl] = run
    streams[impl] = stats['stream_tokens']
    if impl == 'jax ATS budgeted':
      runner.observe(np.asarray(stats['stream_tokens']), bool(stats['overflow']))
      rows[impl].budgets, rows[impl].budget_use = runner.budgets, runner.use()
      rows[impl].reruns = int(bool(stats['overflow']))  # a fixed batch: once over, always over
    if impl == 'jax ATS packed' and _CEILING.value and batch == 1:
      bound = 'jax static ceiling'
      runners[bound] = static_ceiling(dense, np.asarray(stats['kept_tokens'])[0], x)
      rows[bound] = Row(name, batch, bound, 0.0, 0.0, kept, gflops)
  if _TIMM.value:
    runners['timm dense'] = torch_runner(reference, images, dtype)
    rows['timm dense'] = Row(name, batch, 'timm dense', 0.0, 0.0, rows['jax dense'].kept_tokens,
                             flops.dense_gflops(dense.spec))  # fmt: skip
  rounds = {impl: [] for impl in runners}
  calls = {}
  for impl, run in runners.items():
    run()  # warm-up: caches, allocator
    start = time.perf_counter()
    run()
    calls[impl] = math.ceil(MIN_ROUND_S / (time.perf_counter() - start))  # at least 1
  for _ in range(repeats):
    for impl, run in runners.items():  # alternated, so drifts of the machine hit every row
      start = time.perf_counter()
      for _ in range(calls[impl]):
        run()
      rounds[impl].append((time.perf_counter() - start) / calls[impl])
  best = {impl: min(times) for impl, times in rounds.items()}
  for impl, row in rows.items():
    row.ms_per_batch = 1e3 * best[impl]
    row.images_per_sec = batch / best[impl]
    row.speedup = best['jax dense'] / best[impl]
    row.ideal = rows['jax dense'].gflops / row.gflops
    row.efficiency = row.speedup / row.ideal
    row.spread = float(np.median(rounds[impl])) / best[impl] - 1
  return list(rows.values())


def table(rows: list[Row]) -> str:
  lines = [
    '| model | batch | impl | images/s | ms/batch | speed-up | ideal | efficiency | compile s '
    '| kept tokens | GFLOPs/img | spread | budget use | re-runs |',
    '|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    use = '' if math.isnan(r.budget_use) else f'{100 * r.budget_use:.0f}%'
    lines.append(
      f'| {r.model} | {r.batch} | {r.impl} | {r.images_per_sec:.1f} | {r.ms_per_batch:.1f} '
      f'| {r.speedup:.2f}x | {r.ideal:.2f}x | {100 * r.efficiency:.0f}% | {r.compile_s:.1f} '
      f'| {r.kept_tokens:.1f} | {r.gflops:.2f} | {100 * r.spread:.0f}% | {use} '
      f'| {r.reruns if r.budgets else ""} |'
    )
  return '\n'.join(lines)


def cpu_name() -> str:
  """The CPU's model, its widest vector instructions and its core count: timings differ by several
  tens of percent between machines (AVX-512 or AVX2) that `platform.processor()` names alike."""
  try:
    with open('/proc/cpuinfo') as f:
      info = f.read()
  except OSError:
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'
  model = re.search(r'^model name\s*:\s*(.*)$', info, re.M)
  flags = re.search(r'^flags\s*:(.*)$', info, re.M)
  flags = set(flags.group(1).split()) if flags else set()
  isa = 'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else platform.machine()
  return f'{model.group(1) if model else platform.machine()}, {isa}, {os.cpu_count()} cores'


def describe_machine() -> str:
  device = jax.devices()[0]
  torch_device = 'cuda' if torch.cuda.is_available() else f'cpu, {torch.get_num_threads()} threads'
  return (
    f'{device.platform} ({device.device_kind}, {cpu_name()}), '
    f'jax {jax.__version__}, torch {torch.__version__} on {torch_device}; {_DTYPE.value}; '
    f'{_IMAGES.value}; weights random{f", q and k x{_PEAK.value:g}" if _PEAK.value else ""}'
  )


def main(argv: list[str]) -> None:
  del argv
  if _QUICK.value:
    plan, repeats = [('deit_small_patch16_224', 1), ('deit_small_patch16_224', 32)], 3
  else:
    sizes = [int(b) for b in _BATCH_SIZES.value]
    plan, repeats = [(m, b) for m in _MODELS.value for b in sizes], _REPEATS.value
  rows = []
  for name, batch in plan:
    rows += bench_model(name, batch, repeats, _PEAK.value, _DTYPE.value)
  print(describe_machine() + '\n')
  print(table(rows))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'machine': describe_machine(), 'rows': [dataclasses.asdict(r) for r in rows]},
                f, indent=2)  # fmt: skip


if __name__ == '__main__':
  app.run(main)
