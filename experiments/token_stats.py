"""Tokens kept per block and GFLOPs per image of an ATS model, without training.

Weights are random (timm's init) or "peaked": the same with the query and key kernels scaled up,
which sharpens every attention row as trained ViTs' class attention is sharp. Images are real
photos (`experiments.photos`: scikit-image's and scikit-learn's, then crops of them).

  python -m experiments.token_stats  # deit_small_patch16_224, blocks 3-11, cap 197
  python -m experiments.token_stats --model=deit_tiny_patch16_224 --json=/tmp/stats.json
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ats_jax.models import create_model, flops, vit
from experiments import photos

_MODEL = flags.DEFINE_string('model', 'deit_small_patch16_224', 'Registered variant.')
_ATS_BLOCKS = flags.DEFINE_list('ats_blocks', [str(i) for i in range(3, 12)], 'ATS blocks.')
_NUM_TOKENS = flags.DEFINE_float('num_tokens', 197, 'Cap K of every ATS block (<= 1: a ratio).')
_PEAK = flags.DEFINE_float('peak', 4.0, 'Factor on the q and k kernels of the peaked weights.')
_IMAGES = flags.DEFINE_integer('images', 8, 'Real photos (`experiments.photos`).')
_JSON = flags.DEFINE_string('json', None, 'Also write the results here as JSON.')


def sharpen_attention(model: vit.VisionTransformer, factor: float) -> None:
  """Scales every block's query and key kernels by `factor`: logits grow by factor**2."""
  for block in model.blocks:
    kernel = block.attn.qkv.kernel
    dim = kernel.shape[0]
    kernel[...] = kernel[...].at[:, : 2 * dim].multiply(factor)


def measure(model: vit.VisionTransformer, images: jax.Array) -> dict:
  _, stats = nnx.jit(lambda m, x: m(x, return_stats=True))(model, images)
  return {
    'kept_tokens': np.asarray(stats['kept_tokens']).mean(0).round(1).tolist(),
    'gflops': float(np.asarray(stats['gflops']).mean()),
  }


def main(argv: list[str]) -> None:
  del argv
  ats_blocks = [int(b) for b in _ATS_BLOCKS.value]
  # Padded execution: the same tokens and GFLOPs as packed, and it compiles in a fraction.
  model = create_model(
    _MODEL.value, ats_blocks=ats_blocks, num_tokens=_NUM_TOKENS.value, execution='padded'
  )
  model.eval()
  images = jnp.asarray(photos.photos(_IMAGES.value, model.img_size))
  rows = {'random': measure(model, images)}
  sharpen_attention(model, _PEAK.value)
  rows[f'peaked (q, k x{_PEAK.value:g})'] = measure(model, images)
  dense = flops.dense_gflops(model.spec)
  print(
    f'{_MODEL.value}, ATS in blocks {",".join(_ATS_BLOCKS.value)}, cap {_NUM_TOKENS.value:g},'
    f' {_IMAGES.value} images; dense {dense:.2f} GFLOPs\n'
  )
  print('| weights | mean kept tokens per block | GFLOPs/image |\n|---|---|---:|')
  for name, row in rows.items():
    print(f'| {name} | {" ".join(f"{k:g}" for k in row["kept_tokens"])} | {row["gflops"]:.2f} |')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'model': _MODEL.value, 'dense_gflops': dense, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
