"""The demo's speed line: a DeiT-S-sized ATS model (blocks 3-11) against the same weights dense, on
the bundled photos, the size where ATS is meant to save time.

The digits model `make demo` trains has 4 blocks of 37 tokens: there the sampling costs more than
the tokens it saves, so its images/s column says nothing about ATS. This times what the paper's
setting does instead. The weights are random (nothing is downloaded) with the q and k kernels
scaled by PEAK: sharper attention, as trained weights have, so ATS keeps realistic token counts
(about the GFLOPs DeiT-S with ATS reports). Both models are compiled first, then timed in
alternation, ROUNDS rounds, each reporting its best round (the machine's noise hits both alike).

  python -m experiments.demo_speed
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ats_jax.models import create_model, enable
from experiments import photos

NAME = 'deit_small_patch16_224'
ATS_BLOCKS = tuple(range(3, 12))  # the original ATS DeiT-S setting
PEAK = 4.0  # q, k scale of the random weights
BATCH = 32
ROUNDS = 3


def sharp_model(seed: int = 0) -> nnx.Module:
  """DeiT-S with ATS in ATS_BLOCKS, random weights, q and k kernels scaled by PEAK."""
  model = create_model(NAME, ats_blocks=ATS_BLOCKS, num_tokens=(197.0,), seed=seed)
  for block in model.blocks:
    kernel = block.attn.qkv.kernel  # [dim, 3 * dim]: q, k, v columns
    dim = kernel.shape[0]
    kernel[...] = kernel[...].at[:, : 2 * dim].multiply(PEAK)
  model.eval()
  return model


def compiled(model: nnx.Module, images: jax.Array):
  """(call, stats): the compiled forward on `images`, and its kept tokens and GFLOPs."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, return_stats=True))
  forward = forward.lower(state, images).compile()
  _, stats = forward(state, images)
  return (lambda: jax.block_until_ready(forward(state, images))), jax.device_get(stats)


def measure(batch: int = BATCH, rounds: int = ROUNDS) -> dict:
  """Seconds per batch of ATS and dense (best round of alternating ones) and their GFLOPs."""
  images = jnp.asarray(photos.photos(batch))
  ats_model = sharp_model()
  ats, ats_stats = compiled(ats_model, images)
  dense, dense_stats = compiled(enable.disable_ats(ats_model), images)
  best = {'ats': float('inf'), 'dense': float('inf')}
  for _ in range(rounds):
    for name, run in (('ats', ats), ('dense', dense)):
      start = time.perf_counter()
      run()
      best[name] = min(best[name], time.perf_counter() - start)
  return {
    'batch': batch,
    'ats_s': best['ats'],
    'dense_s': best['dense'],
    'ats_gflops': float(np.mean(ats_stats['gflops'])),
    'dense_gflops': float(np.mean(dense_stats['gflops'])),
    'kept_tokens': float(np.asarray(ats_stats['kept_tokens'])[:, list(ATS_BLOCKS)].mean()),
  }


def speed_line(m: dict) -> str:
  """One labelled line for the demo's output."""
  return (
    f'Speed at DeiT-S size (random weights with sharp attention, ATS blocks 3-11, batch '
    f'{m["batch"]}, bundled photos, {jax.devices()[0].platform}): ATS '
    f'{m["batch"] / m["ats_s"]:.1f} images/s, dense {m["batch"] / m["dense_s"]:.1f}: '
    f'{m["dense_s"] / m["ats_s"]:.2f}x faster at {m["ats_gflops"]:.2f} GFLOPs/image against '
    f'{m["dense_gflops"]:.2f} ({m["dense_gflops"] / m["ats_gflops"]:.2f}x fewer; mean kept tokens '
    f'{m["kept_tokens"]:.0f} of 197)'
  )


if __name__ == '__main__':
  print(speed_line(measure()))
