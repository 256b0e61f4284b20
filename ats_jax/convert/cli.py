"""Converts a PyTorch DeiT/timm checkpoint (`.pth` as DeiT ships it, a bare state dict, or timm's
`.safetensors`) into a Flax checkpoint directory that `create_model(..., checkpoint=DIR)` and
`main.py` read.

  python -m convert deit_small_patch16_224-cd65a155.pth ckpt/deit_s --model deit_small_patch16_224
  python -m convert deit_base_patch16_224.pth ckpt/deit_b_384 --model deit_base_patch16_384

Bad input ends with one `error: ...` line and exit status 1; the output directory is written whole
or not at all.
"""

from __future__ import annotations

import argparse
import math
import sys

from ats_jax.convert import pretrained
from ats_jax.models import CheckpointError, flops, get_spec, list_models


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog='python -m convert',
    description=__doc__.split('\n\n')[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    'input',
    help='.pth/.pt/.bin (torch.save), .safetensors or .npz file, or a Hugging Face directory',
  )
  parser.add_argument('output_dir', help='directory to create (must not exist unless --force)')
  parser.add_argument(
    '--model',
    choices=list_models(),
    metavar='NAME',
    help='target variant (default: inferred from the shapes, unless two families fit); one of: '
    + ', '.join(list_models()),
  )
  parser.add_argument('--force', action='store_true', help='replace an existing output directory')
  return parser.parse_args(argv)


def summary(converted: pretrained.Converted, output_dir: str) -> str:
  spec = get_spec(converted.model)
  num_params = sum(math.prod(v.shape) for v in converted.params.values())
  gflops = flops.dense_gflops(spec, num_classes=converted.num_classes)
  d = converted.data
  lines = [
    f'source      {converted.source}',
    f'model       {converted.model} (embed_dim {spec.embed_dim}, depth {spec.depth}, '
    f'heads {spec.num_heads}, {spec.img_size}px, patch {spec.patch_size}'
    f'{", distilled" if spec.distilled else ""})',
    f'classes     {converted.num_classes}',
    f'parameters  {num_params:,} ({len(converted.params)} tensors)',
    f'GFLOPs      {gflops:.2f} per image (dense)',
    f'preprocess  mean {_fmt(d.mean)}, std {_fmt(d.std)}, crop_pct {d.crop_pct}, {d.interpolation}',
    f'layer norm  eps {converted.layer_norm_eps:g}',
    *[f'resized     {note}' for note in converted.notes],
    f'written     {output_dir}',
  ]
  return '\n'.join(lines)


def _fmt(values) -> str:
  return '(' + ', '.join(f'{v:g}' for v in values) + ')'


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    converted = pretrained.convert_file(args.input, args.model)
    pretrained.save_converted(converted, args.output_dir, force=args.force)
  except CheckpointError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(summary(converted, args.output_dir))
  return 0


if __name__ == '__main__':
  sys.exit(main())
