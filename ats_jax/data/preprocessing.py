"""DeiT's image preprocessing for tf.data: timm's transforms, with PIL doing the pixels as in timm.

TensorFlow draws every random choice statelessly from the `seed` passed in (crop box, flip, the
RandAugment ops, the erasing box), so a training example's augmentation depends only on (run seed,
epoch, position): runs are reproducible and resume exactly. PIL then decodes, crops, resizes,
flips and augments, as timm's transforms do on the same draws: the same pixels, bit for bit.
PIL releases the GIL in its image routines, so tf.data's threads run them in parallel.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np
import tensorflow as tf
from PIL import Image

from ats_jax.data import images, randaugment


def _bytes(data: bytes | np.ndarray) -> bytes:
  """A tf.string scalar inside `tf.numpy_function`: bytes, or a 0-d object array (eager mode)."""
  return data if isinstance(data, bytes) else data.item()


def _open(image: bytes | np.ndarray) -> Image.Image:
  """Encoded bytes as timm loads them (`images.load_rgb`), or uint8 pixels [h, w, 3]."""
  if isinstance(image, np.ndarray) and image.dtype == np.uint8:
    return Image.fromarray(image)
  return images.load_rgb(_bytes(image))


def _python_op(fn, inputs: list, dtype: tf.DType, shape: tuple) -> tf.Tensor:
  """fn(*inputs as NumPy) -> an array of `dtype` and static `shape`, as an op tf.data runs in its
  threads (plain Python: autograph would otherwise rewrite fn, and slow every call)."""
  fn = tf.autograph.experimental.do_not_convert(fn)
  return tf.ensure_shape(tf.numpy_function(fn, inputs, dtype, stateful=False), shape)


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """Encoded image bytes (JPEG, PNG, GIF, BMP, ...) -> uint8 [h, w, 3], PIL's RGB pixels; a file
  PIL cannot read raises an OpError (the input pipeline names the file)."""
  return _python_op(lambda d: np.asarray(_open(d)), [data], tf.uint8, (None, None, 3))


def image_shape(image: tf.Tensor) -> tf.Tensor:
  """(height, width) int32 [2] of uint8 pixels, or of encoded bytes from their header alone (a
  JPEG's by TF, without Python; other formats' by PIL)."""
  if image.dtype != tf.string:
    return tf.shape(image)[:2]

  def header(data) -> np.ndarray:
    with images.open_image(_bytes(data)) as opened:
      return np.array(opened.size[::-1], np.int32)

  return tf.cond(
    tf.image.is_jpeg(image),
    lambda: tf.io.extract_jpeg_shape(image)[:2],
    lambda: _python_op(header, [image], tf.int32, (2,)),
  )


def eval_pixels(
  image: tf.Tensor, image_size: int, crop_pct: float = 0.875, interpolation: str = 'bicubic'
) -> tf.Tensor:
  """DeiT eval up to normalisation: shorter side to image_size / crop_pct (256 for 224), centre
  crop. image: encoded bytes or uint8 [h, w, 3] -> uint8 [image_size, image_size, 3]."""
  if interpolation not in images.INTERPOLATIONS:
    raise ValueError(
      f'interpolation must be one of {list(images.INTERPOLATIONS)}, got {interpolation!r}'
    )

  def run(x) -> np.ndarray:
    return np.asarray(images.resize_and_crop(_open(x), image_size, crop_pct, interpolation))

  return _python_op(run, [image], tf.uint8, (image_size, image_size, 3))


def _box_sizes(
  seed: tf.Tensor, area: tf.Tensor, scale: tuple[float, float], ratio: tuple[float, float], n: int
) -> tuple[tf.Tensor, tf.Tensor]:
  """n candidate boxes as timm draws them: area uniform in scale * area, ratio log-uniform.

  Returns int32 [n] (round(sqrt(a * r)), round(sqrt(a / r))), rounded half to even as Python.
  """
  u = tf.random.stateless_uniform([n, 2], seed, dtype=tf.float64)  # [n, 2]
  target = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * tf.cast(area, tf.float64)  # [n]
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])  # [n]
  along = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  across = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  return along, across


def _randint(seed: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
  """Two uniform ints in [0, high[i]] inclusive (Python's random.randint(0, high)). int32 [2]."""
  u = tf.random.stateless_uniform([2], seed, dtype=tf.float64)
  return tf.cast(tf.floor(u * tf.cast(high + 1, tf.float64)), tf.int32)


def crop_box(
  seed: tf.Tensor,
  img_h: tf.Tensor,
  img_w: tf.Tensor,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
  """timm's RandomResizedCropAndInterpolation.get_params: int32 [4] (top, left, height, width).

  10 tries of (area, log-uniform w / h) boxes, the first that fits placed uniformly; else the
  centre crop with the ratio clamped into range.
  """
  seed_box, seed_pos = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  widths, heights = _box_sizes(seed_box, img_h * img_w, scale, ratio, 10)  # [10], [10]
  fits = (widths <= img_w) & (heights <= img_h)  # [10]
  first = tf.argmax(tf.cast(fits, tf.int32))  # the first try that fits
  in_ratio = tf.cast(img_w, tf.float64) / tf.cast(img_h, tf.float64)
  too_tall = tf.cast(tf.round(tf.cast(img_w, tf.float64) / min(ratio)), tf.int32)
  too_wide = tf.cast(tf.round(tf.cast(img_h, tf.float64) * max(ratio)), tf.int32)
  found = tf.reduce_any(fits)
  h = tf.where(found, heights[first], tf.where(in_ratio < min(ratio), too_tall, img_h))
  w = tf.where(found, widths[first], tf.where(in_ratio > max(ratio), too_wide, img_w))
  top_left = _randint(seed_pos, tf.stack([img_h - h, img_w - w]))
  top_left = tf.where(found, top_left, tf.stack([(img_h - h) // 2, (img_w - w) // 2]))
  return tf.concat([top_left, tf.stack([h, w])], 0)


def erasing_box(
  seed: tf.Tensor,
  img_h: int | tf.Tensor,
  img_w: int | tf.Tensor,
  prob: float,
  area: tuple[float, float] = (0.02, 1 / 3),
  aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> tf.Tensor:
  """timm's RandomErasing(prob, mode='pixel', max_count=1) box: int32 [4] (top, left, h, w).

  With probability prob, the first of 10 (area, log-uniform aspect) boxes that fits strictly
  inside; if none fits, or the coin says no, an empty box (h = w = 0).
  """
  seed_apply, seed_box, seed_pos, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  heights, widths = _box_sizes(seed_box, img_h * img_w, area, aspect, 10)  # [10], [10]
  fits = (widths < img_w) & (heights < img_h)  # [10]
  first = tf.argmax(tf.cast(fits, tf.int32))
  erase = (tf.random.stateless_uniform((), seed_apply) < prob) & tf.reduce_any(fits)
  h, w = heights[first], widths[first]
  top, left = tf.unstack(_randint(seed_pos, tf.stack([img_h - h, img_w - w])))
  return tf.where(erase, tf.stack([top, left, h, w]), tf.zeros([4], tf.int32))


def train_draws(
  seed: tf.Tensor, shape: tf.Tensor, image_size: int, aug: ml_collections.ConfigDict
) -> dict[str, tf.Tensor]:
  """Every random choice of DeiT's train transform for an image of `shape` (height, width), drawn
  statelessly from seed int [2]: 'box' int32 [4] (top, left, h, w) of the random-resized crop (the
  whole image when off), 'flip' bool, RandAugment's 'op_index', 'magnitude', 'negate' [num_ops]
  (`randaugment.sample_ops`), and random erasing's 'erase' box in the output (h = 0: none)."""
  seed = tf.cast(seed, tf.int64)  # stateless_split's draws depend on the seed's dtype
  seeds = tf.random.experimental.stateless_split(seed, 4)
  height, width = tf.unstack(tf.cast(shape, tf.int32))
  if aug.random_resized_crop:
    box = crop_box(seeds[0], height, width, tuple(aug.rrc_scale))
  else:
    box = tf.stack([0, 0, height, width])
  op_index, magnitude, negate = randaugment.sample_ops(
    seeds[2], aug.randaugment_num_ops, aug.randaugment_magnitude, aug.randaugment_mstd
  )
  return {
    'box': box,
    'flip': tf.random.stateless_uniform((), seeds[1]) < aug.hflip,
    'op_index': op_index,
    'magnitude': magnitude,
    'negate': negate,
    'erase': erasing_box(seeds[3], image_size, image_size, aug.random_erasing),
  }


def train_pixels(
  image: tf.Tensor, seed: tf.Tensor, image_size: int, aug: ml_collections.ConfigDict
) -> tuple[tf.Tensor, tf.Tensor]:
  """DeiT's train transform up to normalisation: what the input pipeline sends to the device.

  image: encoded bytes or uint8 [h, w, 3]; seed int [2] -> (uint8 [S, S, 3], random erasing's box
  int32 [4]). timm's create_transform(is_training=True) order: random-resized-crop (bicubic),
  flip, RandAugment, by PIL on `train_draws`; then, on the device, normalise and random erasing
  (`device_images`).
  """
  draws = train_draws(seed, image_shape(image), image_size, aug)

  def run(image, box, flip, op_index, magnitude, negate) -> np.ndarray:
    top, left, h, w = (int(v) for v in box)
    pil = _open(image).crop((left, top, left + w, top + h))
    pil = pil.resize((image_size, image_size), images.INTERPOLATIONS['bicubic'])
    if flip:
      pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(randaugment.apply_ops(pil, op_index, magnitude, negate))

  keys = ('box', 'flip', 'op_index', 'magnitude', 'negate')
  pixels = _python_op(
    run, [image, *(draws[k] for k in keys)], tf.uint8, (image_size, image_size, 3)
  )
  return pixels, draws['erase']
