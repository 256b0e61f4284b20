"""The model zoo: DeiT variants with the dimensions of Touvron et al. (2021) and timm."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """Architecture of one registered variant; every field is a `VisionTransformer` argument."""

  embed_dim: int
  depth: int
  num_heads: int
  img_size: int = 224
  patch_size: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  distilled: bool = False


_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)

MODELS: dict[str, ViTSpec] = {
  'deit_tiny_patch16_224': ViTSpec(**_TINY),
  'deit_small_patch16_224': ViTSpec(**_SMALL),
  'deit_base_patch16_224': ViTSpec(**_BASE),
  'deit_base_patch16_384': ViTSpec(**_BASE, img_size=384),
  'deit_tiny_distilled_patch16_224': ViTSpec(**_TINY, distilled=True),
  'deit_small_distilled_patch16_224': ViTSpec(**_SMALL, distilled=True),
  'deit_base_distilled_patch16_224': ViTSpec(**_BASE, distilled=True),
}


def get_spec(name: str) -> ViTSpec:
  """The registered spec for `name`; an unknown name lists the known ones."""
  try:
    return MODELS[name]
  except KeyError:
    raise ValueError(f'unknown model {name!r}; known models: {", ".join(MODELS)}') from None


def list_models() -> list[str]:
  return list(MODELS)
