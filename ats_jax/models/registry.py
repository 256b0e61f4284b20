"""The model zoo: DeiT variants (Touvron et al., 2021) and the AugReg/original ViTs (Dosovitskiy
et al., 2021; Steiner et al., 2022) with timm's dimensions, and the preprocessing each expects.
"""

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


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The evaluation preprocessing a checkpoint was trained with (timm's pretrained data config)."""

  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  crop_pct: float  # resize the shorter side to img_size / crop_pct, then centre-crop img_size
  interpolation: str  # 'bicubic' or 'bilinear'

  def to_json(self) -> dict:
    return dataclasses.asdict(self) | dict(mean=list(self.mean), std=list(self.std))

  @classmethod
  def from_json(cls, d: dict) -> DataConfig:
    return cls(tuple(d['mean']), tuple(d['std']), float(d['crop_pct']), d['interpolation'])


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)  # timm's IMAGENET_INCEPTION_MEAN/STD
# DeiT's own evaluation (deit/datasets.py: resize to 256/224 of the crop), not timm's 0.9.
DEIT_DATA = DataConfig(IMAGENET_MEAN, IMAGENET_STD, 0.875, 'bicubic')
VIT_DATA_224 = DataConfig(INCEPTION_MEAN, INCEPTION_STD, 0.9, 'bicubic')  # timm's AugReg cfgs
VIT_DATA_384 = DataConfig(INCEPTION_MEAN, INCEPTION_STD, 1.0, 'bicubic')

_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)

MODELS: dict[str, ViTSpec] = {
  'deit_tiny_patch16_224': ViTSpec(**_TINY),
  'deit_small_patch16_224': ViTSpec(**_SMALL),
  'deit_base_patch16_224': ViTSpec(**_BASE),
  'deit_base_patch16_384': ViTSpec(**_BASE, img_size=384),
  'deit_tiny_distilled_patch16_224': ViTSpec(**_TINY, distilled=True),
  'deit_small_distilled_patch16_224': ViTSpec(**_SMALL, distilled=True),
  'deit_base_distilled_patch16_224': ViTSpec(**_BASE, distilled=True),
}
# timm's class-token ViTs (AugReg and the original releases). timm has no vit_tiny_patch32, and
# vit_large_patch32_224 exists only as an ImageNet-21k backbone (no head, a pre_logits layer).
for _size, _dims in (('tiny', _TINY), ('small', _SMALL), ('base', _BASE), ('large', _LARGE)):
  for _patch in (16, 32):
    for _img in (224, 384):
      if (_size, _patch) != ('tiny', 32) and (_size, _patch, _img) != ('large', 32, 224):
        MODELS[f'vit_{_size}_patch{_patch}_{_img}'] = ViTSpec(
          **_dims, img_size=_img, patch_size=_patch
        )

DATA: dict[str, DataConfig] = {
  name: DEIT_DATA
  if name.startswith('deit_')
  else (VIT_DATA_224 if spec.img_size == 224 else VIT_DATA_384)
  for name, spec in MODELS.items()
}


def family(name: str) -> str:
  """'deit' or 'vit': variants of one family differ in shape; across families they may not."""
  return name.split('_')[0]


def get_spec(name: str) -> ViTSpec:
  """The registered spec for `name`; an unknown name lists the known ones."""
  try:
    return MODELS[name]
  except KeyError:
    raise ValueError(f'unknown model {name!r}; known models: {", ".join(MODELS)}') from None


def data_config(name: str) -> DataConfig:
  """The preprocessing variant `name`'s released weights expect."""
  get_spec(name)
  return DATA[name]


def list_models() -> list[str]:
  return list(MODELS)
