"""The registered variants as a table: size and cost at a glance."""

from __future__ import annotations

import dataclasses
import math

from ats_jax.models import flops, registry, vit


def num_params(name: str) -> int:
  """Counted on shape-only models of depth 0 and 1 (every block is alike): tracing all blocks of
  every variant took seconds of each `describe`."""
  spec = registry.get_spec(name)
  none, one = (_count(dataclasses.replace(spec, depth=depth)) for depth in (0, 1))
  return none + spec.depth * (one - none)


def _count(spec: registry.ViTSpec) -> int:
  model = vit.abstract_model(**vars(spec))
  return sum(math.prod(p.shape) for p in vit.param_dict(model).values())


def zoo_table() -> str:
  """Markdown table: variant, image size, width/depth/heads, parameters, dense GFLOPs."""
  rows = [
    '| model | img | dim | depth | heads | params (M) | GFLOPs |',
    '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for name, spec in registry.MODELS.items():
    rows.append(
      f'| {name} | {spec.img_size} | {spec.embed_dim} | {spec.depth} | {spec.num_heads} '
      f'| {num_params(name) / 1e6:.1f} | {flops.dense_gflops(spec):.1f} |'
    )
  return '\n'.join(rows)
