"""timm's RandAugment ('rand-m9-mstd0.5-inc1', DeiT's): the draws in TensorFlow, the ops in PIL.

`sample_ops` draws every random choice statelessly from a seed inside tf.data (so augmentation
depends only on (run seed, epoch, position) and resumes exactly); `apply_ops` then runs the ops
on a PIL image as timm does (`timm/data/auto_augment.py`: `NAME_TO_OP`, `LEVEL_TO_ARG`,
`AugmentOp`), giving timm's pixels for the same draws. PIL releases the GIL in its image
routines, so tf.data's threads run them in parallel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

FILL = (124, 116, 104)  # timm's img_mean hparam: round(255 * IMAGENET_DEFAULT_MEAN)
LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is the strongest, also the clipping bound
TRANSLATE_PCT = 0.45  # timm's default translate_pct for the *Rel translations
RESAMPLE = Image.Resampling.BICUBIC  # timm passes DeiT's train interpolation to RandAugment

Op = Callable[[Image.Image, float], Image.Image]
Level = Callable[[float, bool], float]  # (magnitude in [0, 10], negate) -> the op's argument


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
  return image.transform(image.size, Image.Transform.AFFINE, matrix, RESAMPLE, fillcolor=FILL)


def posterize(image: Image.Image, bits: float) -> Image.Image:
  """ImageOps.posterize; 0 bits (timm's magnitude 10) is black, as Pillow < 13 gave (13 raises)."""
  bits = int(bits)
  if bits >= 8:
    return image
  if bits <= 0:
    return Image.new(image.mode, image.size)
  return ImageOps.posterize(image, bits)


def solarize_add(image: Image.Image, add: float, threshold: int = 128) -> Image.Image:
  """timm's solarize_add: add `add` to values below 128, saturating at 255."""
  lut = [min(255, i + int(add)) if i < threshold else i for i in range(256)]
  return image.point(lut * len(image.getbands()))


def rotate(image: Image.Image, degrees: float) -> Image.Image:
  return image.rotate(degrees, resample=RESAMPLE, fillcolor=FILL)


# timm's NAME_TO_OP, each (image, arg) -> image; arg is what the op's level gives.
_OPS: dict[str, Op] = {
  'AutoContrast': lambda image, _: ImageOps.autocontrast(image),
  'Equalize': lambda image, _: ImageOps.equalize(image),
  'Invert': lambda image, _: ImageOps.invert(image),
  'Rotate': rotate,
  'PosterizeIncreasing': posterize,
  'SolarizeIncreasing': lambda image, threshold: ImageOps.solarize(image, int(threshold)),
  'SolarizeAdd': solarize_add,
  'ColorIncreasing': lambda image, f: ImageEnhance.Color(image).enhance(f),
  'ContrastIncreasing': lambda image, f: ImageEnhance.Contrast(image).enhance(f),
  'BrightnessIncreasing': lambda image, f: ImageEnhance.Brightness(image).enhance(f),
  'SharpnessIncreasing': lambda image, f: ImageEnhance.Sharpness(image).enhance(f),
  'ShearX': lambda image, f: _affine(image, (1, f, 0, 0, 1, 0)),
  'ShearY': lambda image, f: _affine(image, (1, 0, 0, f, 1, 0)),
  'TranslateXRel': lambda image, pct: _affine(image, (1, 0, pct * image.size[0], 0, 1, 0)),
  'TranslateYRel': lambda image, pct: _affine(image, (1, 0, 0, 0, 1, pct * image.size[1])),
}


def _signed(value: float, negate: bool) -> float:
  """timm's _randomly_negate, its coin drawn by `sample_ops`."""
  return -value if negate else value


def _no_arg(magnitude: float, negate: bool) -> float:
  return 0.0


def _enhance_level(magnitude: float, negate: bool) -> float:
  return max(0.1, 1.0 + _signed(magnitude / LEVEL_DENOM * 0.9, negate))  # 1 -> 0.1 or 1.9


def _shear_level(magnitude: float, negate: bool) -> float:
  return _signed(magnitude / LEVEL_DENOM * 0.3, negate)  # [-0.3, 0.3]


def _translate_level(magnitude: float, negate: bool) -> float:
  return _signed(magnitude / LEVEL_DENOM * TRANSLATE_PCT, negate)  # [-0.45, 0.45] of the size


# timm's LEVEL_TO_ARG for the ops above (magnitude already clipped to [0, 10]).
_LEVELS: dict[str, Level] = {
  'AutoContrast': _no_arg,
  'Equalize': _no_arg,
  'Invert': _no_arg,
  'Rotate': lambda m, n: _signed(m / LEVEL_DENOM * 30.0, n),  # degrees in [-30, 30]
  'PosterizeIncreasing': lambda m, n: 4 - int(m / LEVEL_DENOM * 4),  # bits kept: 4 down to 0
  'SolarizeIncreasing': lambda m, n: 256 - min(256, int(m / LEVEL_DENOM * 256)),  # 256 down to 0
  'SolarizeAdd': lambda m, n: min(128, int(m / LEVEL_DENOM * 110)),  # 0 up to 110
  'ColorIncreasing': _enhance_level,
  'ContrastIncreasing': _enhance_level,
  'BrightnessIncreasing': _enhance_level,
  'SharpnessIncreasing': _enhance_level,
  'ShearX': _shear_level,
  'ShearY': _shear_level,
  'TranslateXRel': _translate_level,
  'TranslateYRel': _translate_level,
}
OP_NAMES = tuple(_OPS)  # timm's _RAND_INCREASING_TRANSFORMS, in its order


def apply_op(image: Image.Image, op_index: int, magnitude: float, negate: bool) -> Image.Image:
  """Op `OP_NAMES[op_index]` at `magnitude` (timm's AugmentOp once its coins are drawn);
  op_index == len(OP_NAMES) is the identity (the op's probability coin said no)."""
  if op_index == len(OP_NAMES):
    return image
  name = OP_NAMES[op_index]
  return _OPS[name](image, _LEVELS[name](float(magnitude), bool(negate)))


def apply_ops(
  image: Image.Image, op_index: Sequence[int], magnitude: Sequence[float], negate: Sequence[bool]
) -> Image.Image:
  """The layers `sample_ops` drew, in order."""
  for index, m, n in zip(op_index, magnitude, negate, strict=True):
    image = apply_op(image, int(index), m, n)
  return image


def sample_ops(
  seed: tf.Tensor, num_ops: int, magnitude: float, magnitude_std: float, prob: float = 0.5
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """timm's RandAugment draws for num_ops layers: (op_index int32, magnitude float64, negate bool).

  Ops uniform with replacement (np.random.choice); each skipped (index len(OP_NAMES)) with
  probability 1 - prob; magnitude gauss(magnitude, magnitude_std) clipped to [0, 10]; the sign coin
  of _randomly_negate. Each [num_ops].
  """
  s_op, s_apply, s_mag, s_sign = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  op_index = tf.random.stateless_uniform([num_ops], s_op, 0, len(OP_NAMES), dtype=tf.int32)
  skip = tf.random.stateless_uniform([num_ops], s_apply) >= prob
  op_index = tf.where(skip, len(OP_NAMES), op_index)
  noise = tf.random.stateless_normal([num_ops], s_mag, dtype=tf.float64)
  mags = tf.clip_by_value(magnitude + magnitude_std * noise, 0.0, LEVEL_DENOM)
  negate = tf.random.stateless_uniform([num_ops], s_sign) > 0.5
  return op_index, mags, negate
