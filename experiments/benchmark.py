"""Inference throughput of ats-jax beside PyTorch, on the same weights, in one run on one machine.

For each model and batch size, under `nnx.jit`: our Flax model dense; with ATS (the original's
setting: blocks 3-11, cap 197) in padded execution (fixed shapes, bucket_size=0) and in compacted
execution (bucket_size=16, the default); and the dense model run on exactly the token counts the
compacted run used per block ("dense @ ATS tokens": what compaction could cost at best). Beside
them timm's dense model with the same weights and, when installed, vit-pytorch's ATS ViT of the
same size (its own random weights and Gumbel sampling, capped at the tokens our ATS kept: a speed
reference, not the same function). Images/s is the median of repeated timed runs after
compilation and a warm-up run.

  python -m experiments.benchmark --quick                  # ~2 minutes on 2 CPU cores
  python -m experiments.benchmark --batch_sizes=1,32,128 --json=/tmp/bench.json
  python -m experiments.benchmark --peak=4                 # sharper attention: fewer tokens kept
  python -m experiments.benchmark --quick --peak=4 --more_buckets=8,32,64  # other ladders
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch
from absl import app, flags
from flax import nnx

from ats_jax.models import compact, create_model, pretrained
from ats_jax.models.factory import load_params

ATS_BLOCKS = tuple(range(3, 12))  # the original's DeiT-S setting
BUCKET_SIZE = 16  # the model's default
_MODELS = flags.DEFINE_list(
  'models', ['deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224'], 'Models.'
)
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '8', '32'], 'Batch sizes.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per row (the median is reported).')
_PEAK = flags.DEFINE_float('peak', 0.0, 'Scale the q, k kernels (sharper attention); 0 = as is.')
_MORE_BUCKETS = flags.DEFINE_list(
  'more_buckets', [], 'Also time compacted execution with these bucket sizes (e.g. 8,32,64).'
)
_QUICK = flags.DEFINE_bool('quick', False, 'deit_tiny at batch 8, deit_small at 32; 3 repeats.')
_JSON = flags.DEFINE_string('json', None, 'Also write the rows here.')


@dataclasses.dataclass
class Row:
  model: str
  batch: int
  impl: str
  images_per_sec: float
  ms_per_batch: float
  compile_s: float
  peak_mem_mb: float | None
  kept_tokens: float | None  # mean over blocks and images: tokens entering the MLPs
  gflops: float | None


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, float]:
  """(first call incl. compilation, median of `repeats` timed calls after one warm-up), seconds."""
  start = time.perf_counter()
  run()
  first = time.perf_counter() - start
  run()  # warm-up: caches, allocator
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def random_timm(name: str, peak: float) -> torch.nn.Module:
  """timm's model with random weights (perturbed like the tests), q and k scaled by `peak`."""
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.02)
    if peak:
      for block in model.blocks:
        dim = block.attn.qkv.in_features
        block.attn.qkv.weight[: 2 * dim] *= peak
  return model


def flax_twin(reference: torch.nn.Module, name: str, **overrides) -> nnx.Module:
  """Our model with `reference`'s weights, converted as `python -m convert` does."""
  state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
  model = create_model(name, **overrides)
  load_params(model, dict(pretrained.convert_state_dict(state_dict, name).params), name)
  model.eval()
  return model


def jax_peak_mem_mb() -> float | None:
  stats = jax.devices()[0].memory_stats()
  return stats['peak_bytes_in_use'] / 2**20 if stats and 'peak_bytes_in_use' in stats else None


def bench_jax(name: str, impl: str, forward, model: nnx.Module, images: jax.Array, repeats: int):
  """`forward(model, images) -> (logits, stats or None)`, jitted and timed."""
  forward = nnx.jit(forward)
  first, median = median_seconds(lambda: jax.block_until_ready(forward(model, images)), repeats)
  _, stats = forward(model, images)
  kept = gflops = None
  if stats is not None:
    kept, gflops = float(np.mean(stats['kept_tokens'])), float(np.mean(stats['gflops']))
  b = images.shape[0]
  compile_s = max(first - median, 0.0)
  return Row(name, b, impl, b / median, 1e3 * median, compile_s, jax_peak_mem_mb(), kept, gflops)


def with_stats(model: nnx.Module, images: jax.Array):
  return model(images, return_stats=True)


def tokens_per_block(kept_tokens: np.ndarray, num_tokens: int) -> list[int]:
  """The slots each block ran on in compacted execution, from the kept tokens [B, depth]."""
  needed = [num_tokens] + kept_tokens.max(0).tolist()[:-1]  # entering each block, fullest image
  sizes = compact.ladder(num_tokens, BUCKET_SIZE)
  first_ats = ATS_BLOCKS[0]
  return [n if i <= first_ats else sizes[compact.bucket(sizes, n)] for i, n in enumerate(needed)]


def dense_at(tokens: list[int]):
  """A forward of the dense model with block i on its first tokens[i] tokens, static shapes."""

  def forward(model: nnx.Module, images: jax.Array):
    x = model.embed(images.astype(model.dtype))
    for block, size in zip(model.blocks, tokens, strict=True):
      x, _ = block(x[:, :size])
    return model.head_logits(x), None

  return forward


def bench_torch(name: str, impl: str, model: torch.nn.Module, images: np.ndarray, repeats: int):
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = model.to(device)
  x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous().to(device)

  def run():
    with torch.inference_mode():
      model(x)
    if device == 'cuda':
      torch.cuda.synchronize()

  first, median = median_seconds(run, repeats)
  mem = torch.cuda.max_memory_allocated() / 2**20 if device == 'cuda' else None
  b = images.shape[0]
  return Row(name, b, impl, b / median, 1e3 * median, max(first - median, 0.0), mem, None, None)


def vit_pytorch_ats(reference: torch.nn.Module, kept_per_block: list[float]) -> torch.nn.Module:
  """vit-pytorch's ATS ViT of the reference's size, each block capped at the tokens ours kept."""
  from vit_pytorch.ats_vit import ViT

  dim, depth = reference.embed_dim, len(reference.blocks)
  heads = reference.blocks[0].attn.num_heads
  caps = tuple(max(int(round(k)) - 1, 1) for k in kept_per_block)  # image tokens, cls excluded
  torch.manual_seed(0)
  return ViT(
    image_size=224,
    patch_size=16,
    num_classes=1000,
    dim=dim,
    depth=depth,
    heads=heads,
    mlp_dim=4 * dim,
    dim_head=dim // heads,
    max_tokens_per_depth=caps,
  ).eval()


def bench_model(name: str, batch: int, repeats: int, peak: float) -> list[Row]:
  reference = random_timm(name, peak)
  images = jax.random.normal(jax.random.key(batch), (batch, 224, 224, 3), jnp.float32)
  dense = flax_twin(reference, name)
  more = [int(b) for b in _MORE_BUCKETS.value]
  ats = {
    size: flax_twin(reference, name, ats_blocks=ATS_BLOCKS, num_tokens=197, bucket_size=size)
    for size in (0, BUCKET_SIZE, *more)
  }
  kept = np.asarray(nnx.jit(with_stats)(ats[BUCKET_SIZE], images)[1]['kept_tokens'])
  tokens = tokens_per_block(kept, dense.pos_embed.shape[1])
  rows = [
    bench_jax(name, 'jax dense', with_stats, dense, images, repeats),
    bench_jax(name, 'jax ATS padded', with_stats, ats[0], images, repeats),
    bench_jax(name, 'jax ATS compacted', with_stats, ats[BUCKET_SIZE], images, repeats),
    bench_jax(name, 'jax dense @ ATS tokens', dense_at(tokens), dense, images, repeats),
    *[
      bench_jax(name, f'jax ATS compacted, bucket {b}', with_stats, ats[b], images, repeats)
      for b in more
    ],
    bench_torch(name, 'timm dense', reference, np.asarray(images), repeats),
  ]
  try:
    twin = vit_pytorch_ats(reference, kept.mean(0).tolist())
    rows.append(bench_torch(name, 'vit-pytorch ATS', twin, np.asarray(images), repeats))
  except ImportError:
    pass  # vit-pytorch is optional: `pip install -r requirements-test.txt`
  return rows


def table(rows: list[Row]) -> str:
  """Markdown, with each row's speed relative to timm dense at the same model and batch."""

  def speed(impl: str) -> dict:
    return {(r.model, r.batch): r.images_per_sec for r in rows if r.impl == impl}

  timm_speed, jax_speed = speed('timm dense'), speed('jax dense')
  lines = [
    '| model | batch | impl | images/s | vs timm dense | vs jax dense | ms/batch | compile s '
    '| peak MiB | kept tokens | GFLOPs/img |',
    '|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]

  def fmt(value, spec):
    return '-' if value is None else format(value, spec)

  for r in rows:
    key = (r.model, r.batch)
    lines.append(
      f'| {r.model} | {r.batch} | {r.impl} | {r.images_per_sec:.1f} '
      f'| {r.images_per_sec / timm_speed[key]:.2f}x | {r.images_per_sec / jax_speed[key]:.2f}x '
      f'| {r.ms_per_batch:.1f} | {r.compile_s:.1f} | {fmt(r.peak_mem_mb, ".0f")} '
      f'| {fmt(r.kept_tokens, ".1f")} | {fmt(r.gflops, ".2f")} |'
    )
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  del argv
  if _QUICK.value:
    plan, repeats = [('deit_tiny_patch16_224', 8), ('deit_small_patch16_224', 32)], 3
  else:
    sizes = [int(b) for b in _BATCH_SIZES.value]
    plan, repeats = [(m, b) for m in _MODELS.value for b in sizes], _REPEATS.value
  rows = []
  for name, batch in plan:
    rows += bench_model(name, batch, repeats, _PEAK.value)
  device = jax.devices()[0]
  print(
    f'{device.platform} ({device.device_kind}), {jax.device_count()} device(s), '
    f'torch {torch.__version__} on {"cuda" if torch.cuda.is_available() else "cpu"} '
    f'({torch.get_num_threads()} threads); weights random'
    f'{f", q and k x{_PEAK.value:g}" if _PEAK.value else ""}\n'
  )
  print(table(rows))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(
        {
          'device': str(device.device_kind),
          'peak': _PEAK.value,
          'rows': [dataclasses.asdict(r) for r in rows],
        },
        f,
        indent=2,
      )


if __name__ == '__main__':
  app.run(main)
