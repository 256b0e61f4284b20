"""timm's RandAugment ('rand-m9-mstd0.5-inc1', DeiT's) as stateless per-example TensorFlow ops.

Mirrors `timm/data/auto_augment.py`: `NAME_TO_OP` (the PIL ops), `LEVEL_TO_ARG` (magnitude -> op
argument), `AugmentOp` (apply with probability, Gaussian magnitude noise) and `RandAugment` (ops
drawn uniformly with replacement). Images are float32 [H, W, 3] of whole numbers in [0, 255], PIL's
uint8 image; each op rounds where its PIL counterpart does (mostly truncation), so the ops agree
with timm's to the intensity level (tests/test_preprocessing.py measures by how much).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf

FILL = (124, 116, 104)  # timm's img_mean hparam: round(255 * IMAGENET_DEFAULT_MEAN)
LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is the strongest, also the clipping bound
TRANSLATE_PCT = 0.45  # timm's default translate_pct for the *Rel translations

Op = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
Level = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _trunc_uint8(x: tf.Tensor) -> tf.Tensor:
  """C's (UINT8) cast after clipping, as PIL stores its float results."""
  return tf.floor(tf.clip_by_value(x, 0.0, 255.0))


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's Image.blend(degenerate, image, factor) in float32, as ImageEnhance's enhance()."""
  factor = tf.cast(factor, tf.float32)
  return _trunc_uint8(degenerate + factor * (image - degenerate))


def _luma(image: tf.Tensor) -> tf.Tensor:
  """PIL's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point). [H, W, 3] -> [H, W] float32."""
  rgb = tf.cast(image, tf.int32)
  luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
  luma = tf.bitwise.right_shift(luma, 16)
  return tf.cast(luma, tf.float32)


def _bicubic(v: list[tf.Tensor], d: tf.Tensor) -> tf.Tensor:
  """PIL Geometry.c's BICUBIC macro (the a = -1 cubic) on taps v at offsets -1, 0, 1, 2.

  Kept in PIL's Horner form so flat regions give exactly their value before truncation.
  """
  p2 = v[2] - v[0]
  p3 = 2 * (v[0] - v[1]) + v[2] - v[3]
  p4 = -v[0] + v[1] - v[2] + v[3]
  return v[1] + d * (p2 + d * (p3 + d * p4))


def affine(
  image: tf.Tensor,
  matrix: list[tf.Tensor],
  fill: tuple[int, ...] = FILL,
  rows_only: bool = False,
) -> tf.Tensor:
  """PIL's img.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill).

  Output pixel centre (x + .5, y + .5) samples the input at (a x + b y + c, d x + e y + f); points
  outside the input take `fill`, others PIL's bicubic with edge-clamped taps, truncated to uint8.
  Written out because tf.raw_ops.ImageProjectiveTransformV3 has no bicubic and DeiT's RandAugment
  resamples bicubic (timm passes the train interpolation to RandAugment). Coordinates are float64
  as PIL's, the tap sums float32 (PIL: double; float64 costs twice the time), which flips a
  truncation by one level for ~0.1-0.2% of values.
  `rows_only` (d = 0, e = 1, f = 0: each output row samples its own input row, as the shears and
  translations along x) takes the 4 taps along x alone: PIL's weight at y offset 0 is exactly 1.
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  a, b, c, d, e, f = (tf.cast(m, tf.float64) for m in matrix)
  ys = tf.range(h, dtype=tf.float64)[:, None] + 0.5  # [H, 1]
  xs = tf.range(w, dtype=tf.float64)[None, :] + 0.5  # [1, W]
  x_in = a * xs + b * ys + c  # [H, W]
  y_in = d * xs + e * ys + f  # [H, W]
  hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  inside = (x_in >= 0) & (x_in < wf) & (y_in >= 0) & (y_in < hf)  # [H, W]
  x_in, y_in = x_in - 0.5, y_in - 0.5  # to pixel-index coordinates
  x0, y0 = tf.floor(x_in), tf.floor(y_in)
  dx = tf.cast(x_in - x0, tf.float32)[..., None]  # [H, W, 1]
  dy = tf.cast(y_in - y0, tf.float32)[..., None]
  # Taps outside the input repeat its edge (PIL clamps them): pad by 2 and index the padding.
  padded = _edge_pad(image, 2)  # [H + 4, W + 4, 3]
  flat = tf.reshape(padded, [-1, 3])  # [(H + 4) * (W + 4), 3]
  row = tf.cast(tf.clip_by_value(y0, -1.0, hf - 1.0), tf.int32) + 1  # tap -1, in padded rows
  col = tf.cast(tf.clip_by_value(x0, -1.0, wf - 1.0), tf.int32) + 1
  base = row * (w + 4) + col  # [H, W]: tap (-1, -1) of each output pixel in `flat`

  def along_x(tap_row: int) -> tf.Tensor:  # 4 taps of one row, interpolated along x: [H, W, 3]
    return _bicubic([tf.gather(flat, base + tap_row * (w + 4) + i) for i in range(4)], dx)

  if rows_only:  # the row at y offset 0; PIL's bicubic at dy = 0 returns it exactly
    out = along_x(1)
  else:
    out = _bicubic([along_x(j) for j in range(4)], dy)  # along x first, as PIL; [H, W, 3]
  out = _trunc_uint8(out)
  return tf.where(inside[..., None], out, tf.constant(fill, tf.float32))


def _edge_pad(image: tf.Tensor, pad: int) -> tf.Tensor:
  """image [H, W, C] with its edge rows and columns repeated `pad` times. [H + 2p, W + 2p, C]."""
  image = tf.concat([image[:1]] * pad + [image] + [image[-1:]] * pad, 0)
  return tf.concat([image[:, :1]] * pad + [image] + [image[:, -1:]] * pad, 1)


# The ops: timm's NAME_TO_OP, each (image, arg) -> image; arg is what timm's level function returns.


def auto_contrast(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.autocontrast: per channel, stretch [min, max] to [0, 255] (truncating LUT)."""
  lo = tf.reduce_min(image, axis=[0, 1])  # [3]
  hi = tf.reduce_max(image, axis=[0, 1])  # [3]
  scale = 255.0 / tf.cast(tf.maximum(hi - lo, 1.0), tf.float64)
  offset = -tf.cast(lo, tf.float64) * scale
  out = tf.cast(_trunc_uint8(tf.cast(image, tf.float64) * scale + offset), tf.float32)
  return tf.where(hi > lo, out, image)  # a flat channel is left as is


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.equalize's LUT for one channel. [H, W] -> [H, W]."""
  values = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(values, minlength=256, maxlength=256)  # [256]
  last = tf.gather(hist, tf.reduce_max(values))  # count of the highest value present
  step = (tf.reduce_sum(hist) - last) // 255
  lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // tf.maximum(step, 1)  # [256]
  lut = tf.clip_by_value(lut, 0, 255)  # PIL's point() clips the LUT to uint8
  return tf.where(step > 0, tf.cast(tf.gather(lut, values), tf.float32), channel)


def equalize(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.equalize, per channel."""
  return tf.stack([_equalize_channel(image[..., i]) for i in range(3)], axis=-1)


def invert(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.invert."""
  return 255.0 - image


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  """PIL img.rotate(degrees) counter-clockwise about the image centre (w / 2, h / 2)."""
  h, w = (tf.cast(s, tf.float64) for s in (tf.shape(image)[0], tf.shape(image)[1]))
  angle = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = w / 2, h / 2
  # PIL's inverse matrix [cos, sin, c; -sin, cos, f], centred on (cx, cy)
  c = cos * -cx + sin * -cy + cx
  f = -sin * -cx + cos * -cy + cy
  return affine(image, [cos, sin, c, -sin, cos, f])


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.posterize: keep the top `bits` bits (0 bits -> black, as timm's level 10)."""
  step = tf.cast(2 ** (8 - tf.cast(bits, tf.int32)), tf.float32)
  return tf.floor(image / step) * step


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.solarize: invert values >= threshold."""
  return tf.where(image < tf.cast(threshold, tf.float32), image, 255.0 - image)


def solarize_add(image: tf.Tensor, add: tf.Tensor) -> tf.Tensor:
  """timm's solarize_add: add `add` to values below 128, saturating at 255."""
  return tf.where(image < 128.0, tf.minimum(image + tf.cast(add, tf.float32), 255.0), image)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance.Color: blend with the greyscale (L) image."""
  return _blend(_luma(image)[..., None], image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance.Contrast: blend with the rounded mean grey level."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_luma(image), tf.float64)) + 0.5)
  return _blend(tf.cast(mean, tf.float32), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance.Brightness: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3 [1 1 1; 1 5 1; 1 1 1] / 13).

  PIL leaves the one-pixel border of the filtered image unfiltered, so the border never changes.
  """
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32)
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])  # [3, 3, 3 (in), 1]
  total = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]  # [H-2, W-2, 3]
  smooth = tf.floor(total / 13.0 + 0.5)  # PIL rounds here (never a tie: 13 is odd)
  inner = _blend(smooth, image[1:-1, 1:-1], factor)  # [H-2, W-2, 3]
  return tf.pad(inner - image[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]]) + image


def _transposed(op: Op, image: tf.Tensor, arg: tf.Tensor) -> tf.Tensor:
  """op on the image with rows and columns swapped: a warp along y as one along x (4 taps)."""
  return tf.transpose(op(tf.transpose(image, [1, 0, 2]), arg), [1, 0, 2])


def shear_x(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """timm's shear_x: PIL affine (1, factor, 0, 0, 1, 0)."""
  return affine(image, [1.0, factor, 0.0, 0.0, 1.0, 0.0], rows_only=True)


def shear_y(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """timm's shear_y: PIL affine (1, 0, 0, factor, 1, 0), shear_x of the transpose."""
  return _transposed(shear_x, image, factor)


def _translate_x(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
  return affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], rows_only=True)


def translate_x_rel(image: tf.Tensor, pct: tf.Tensor) -> tf.Tensor:
  """timm's translate_x_rel: shift by pct * width pixels (content moves left for pct > 0)."""
  pixels = tf.cast(pct, tf.float64) * tf.cast(tf.shape(image)[1], tf.float64)
  return _translate_x(image, pixels)


def translate_y_rel(image: tf.Tensor, pct: tf.Tensor) -> tf.Tensor:
  """timm's translate_y_rel: shift by pct * height pixels (content moves up for pct > 0), as
  translate_x_rel of the transpose."""
  pixels = tf.cast(pct, tf.float64) * tf.cast(tf.shape(image)[0], tf.float64)
  return _transposed(_translate_x, image, pixels)


# The levels: timm's LEVEL_TO_ARG, each (magnitude in [0, 10], negate) -> the op's argument.


def _signed(value: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  """timm's _randomly_negate, the coin drawn by the caller."""
  return tf.where(negate, -value, value)


def _no_arg(magnitude: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  del negate
  return tf.zeros_like(magnitude)


def _rotate_level(magnitude: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  return _signed(magnitude / LEVEL_DENOM * 30.0, negate)  # degrees in [-30, 30]


def _posterize_increasing_level(magnitude: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  del negate
  return 4.0 - tf.floor(magnitude / LEVEL_DENOM * 4.0)  # bits kept: 4 down to 0


def _solarize_increasing_level(magnitude: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  del negate
  return 256.0 - tf.minimum(tf.floor(magnitude / LEVEL_DENOM * 256.0), 256.0)  # 256 down to 0


def _solarize_add_level(magnitude: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  del negate
  return tf.minimum(tf.floor(magnitude / LEVEL_DENOM * 110.0), 128.0)  # 0 up to 110


def _enhance_increasing_level(magnitude: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  return tf.maximum(1.0 + _signed(magnitude / LEVEL_DENOM * 0.9, negate), 0.1)  # 1 -> 0.1 or 1.9


def _shear_level(magnitude: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  return _signed(magnitude / LEVEL_DENOM * 0.3, negate)  # [-0.3, 0.3]


def _translate_rel_level(magnitude: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  return _signed(magnitude / LEVEL_DENOM * TRANSLATE_PCT, negate)  # [-0.45, 0.45] of the size


# timm's _RAND_INCREASING_TRANSFORMS, in its order: name -> (op, level).
RAND_INCREASING_OPS: dict[str, tuple[Op, Level]] = {
  'AutoContrast': (auto_contrast, _no_arg),
  'Equalize': (equalize, _no_arg),
  'Invert': (invert, _no_arg),
  'Rotate': (rotate, _rotate_level),
  'PosterizeIncreasing': (posterize, _posterize_increasing_level),
  'SolarizeIncreasing': (solarize, _solarize_increasing_level),
  'SolarizeAdd': (solarize_add, _solarize_add_level),
  'ColorIncreasing': (color, _enhance_increasing_level),
  'ContrastIncreasing': (contrast, _enhance_increasing_level),
  'BrightnessIncreasing': (brightness, _enhance_increasing_level),
  'SharpnessIncreasing': (sharpness, _enhance_increasing_level),
  'ShearX': (shear_x, _shear_level),
  'ShearY': (shear_y, _shear_level),
  'TranslateXRel': (translate_x_rel, _translate_rel_level),
  'TranslateYRel': (translate_y_rel, _translate_rel_level),
}
OP_NAMES = tuple(RAND_INCREASING_OPS)


def apply_op(
  image: tf.Tensor, op_index: tf.Tensor, magnitude: tf.Tensor, negate: tf.Tensor
) -> tf.Tensor:
  """Op `OP_NAMES[op_index]` at `magnitude` (timm's AugmentOp once its coins are drawn).

  op_index == len(OP_NAMES) is the identity (the op's probability coin said no); tf.switch_case
  runs only the chosen branch.
  """
  magnitude = tf.cast(magnitude, tf.float64)  # levels in double, as timm's Python floats
  negate = tf.convert_to_tensor(negate, tf.bool)

  def branch(op: Op, level: Level) -> Callable[[], tf.Tensor]:
    return lambda: op(image, level(magnitude, negate))

  branches = [branch(op, level) for op, level in RAND_INCREASING_OPS.values()]
  return tf.switch_case(tf.convert_to_tensor(op_index, tf.int32), branches + [lambda: image])


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


def rand_augment(
  image: tf.Tensor,
  seed: tf.Tensor,
  num_ops: int = 2,
  magnitude: float = 9.0,
  magnitude_std: float = 0.5,
  prob: float = 0.5,
) -> tf.Tensor:
  """timm's rand_augment_transform(f'rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1').

  image float32 [H, W, 3] of whole numbers in [0, 255] (PIL's uint8), returned likewise.
  """
  op_index, mags, negate = sample_ops(seed, num_ops, magnitude, magnitude_std, prob)
  for i in range(num_ops):
    image = tf.ensure_shape(apply_op(image, op_index[i], mags[i], negate[i]), image.shape)
  return image
