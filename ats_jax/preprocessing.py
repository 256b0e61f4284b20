"""DeiT's image preprocessing as per-example TensorFlow functions for tf.data (timm's transforms),
from decoding the file as PIL does to the normalised tensor.

Every random choice is stateless, drawn from the `seed` passed in, so a training example's
augmentation depends only on (run seed, epoch, position): runs are reproducible and resume exactly.
"""

from __future__ import annotations

import io
import math

import ml_collections
import numpy as np
import PIL.Image
import tensorflow as tf

from ats_jax import randaugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN, DeiT's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """Encoded image bytes -> uint8 [h, w, 3]: the pixels of PIL's `Image.open(f).convert('RGB')`.

  timm, torchvision and the original ATS load images with PIL. JPEGs (found by their magic bytes,
  whatever the file is called) decode with libjpeg's accurate integer IDCT and fancy upsampling,
  as PIL does; TF's default fast IDCT is off by up to ~16 levels in half or more of the pixels.
  CMYK/YCCK JPEGs go through PIL itself: TF converts CMYK to RGB rounding down, PIL to nearest
  (1 level apart in ~60% of pixels). Other formats (PNG, GIF, BMP) use tf.io.decode_image. Grey
  becomes RGB; alpha is dropped, as convert('RGB') drops it.
  """

  def jpeg() -> tf.Tensor:
    components = tf.io.extract_jpeg_shape(data)[2]
    return tf.cond(
      components == 4,
      lambda: _decode_with_pil(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
    )

  return tf.cond(
    tf.image.is_jpeg(data),
    jpeg,
    lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
  )


def _decode_with_pil(data: tf.Tensor) -> tf.Tensor:
  """PIL's decoding inside the graph (for the rare CMYK JPEG): uint8 [h, w, 3]."""

  def decode(encoded: bytes | np.ndarray) -> np.ndarray:  # eager mode: a 0-d object array
    data = encoded if isinstance(encoded, bytes) else encoded.item()
    with PIL.Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert('RGB'))

  image = tf.numpy_function(decode, [data], tf.uint8, stateful=False)
  image.set_shape((None, None, 3))
  return image


def normalize(
  image: tf.Tensor, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD
) -> tf.Tensor:
  """uint8 or [0, 255] float [H, W, 3] -> float32 normalised with `mean` and `std` (of [0, 1])."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tuple(mean)) / tuple(std)


def resize_like_pil(image: tf.Tensor, size: tuple, method: str = 'bicubic') -> tf.Tensor:
  """PIL's Image.resize (Resample.c): a pass along the rows, rounded to uint8, then the columns.

  One 2-D tf.image.resize differs from PIL by ~0.15 levels on average; these passes agree to
  ~0.001 where Pillow takes them in this order (recent Pillow sometimes runs the columns first).
  image [h, w, C] -> float32 [size, C] of whole numbers in 0..255.
  """
  new_h, new_w = size
  for pass_size in ((tf.shape(image)[0], new_w), (new_h, new_w)):
    image = tf.image.resize(image, pass_size, method=method, antialias=True)
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  return image


def eval_image(
  image: tf.Tensor,
  image_size: int,
  crop_pct: float = 0.875,
  interpolation: str = 'bicubic',
  mean: tuple = IMAGENET_MEAN,
  std: tuple = IMAGENET_STD,
) -> tf.Tensor:
  """DeiT eval: shorter side to image_size / crop_pct (256 for 224), centre crop, normalise.

  image uint8 [h, w, 3] -> float32 [image_size, image_size, 3]. The defaults are DeiT's; a
  checkpoint records its own (`registry.DataConfig`).
  """
  scale_size = int(image_size / crop_pct)  # timm: math.floor(img_size / crop_pct)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  # torchvision's Resize(int): shorter side to scale_size, longer int(scale_size * long / short)
  new_h = tf.where(h <= w, scale_size, scale_size * h // w)
  new_w = tf.where(h <= w, scale_size * w // h, scale_size)
  image = resize_like_pil(image, (new_h, new_w), interpolation)
  # torchvision's CenterCrop: int(round((size - crop) / 2)), Python rounding half to even
  top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2), tf.int32)
  image = image[top : top + image_size, left : left + image_size]
  return normalize(tf.ensure_shape(image, (image_size, image_size, 3)), mean, std)


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


def random_resized_crop(
  image: tf.Tensor,
  seed: tf.Tensor,
  image_size: int,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
  interpolation: str = 'bicubic',
) -> tf.Tensor:
  """timm's RandomResizedCropAndInterpolation: float32 [S, S, 3] of whole numbers in 0..255."""
  top, left, h, w = tf.unstack(crop_box(seed, tf.shape(image)[0], tf.shape(image)[1], scale, ratio))
  crop = image[top : top + h, left : left + w]
  crop = resize_like_pil(crop, (image_size, image_size), interpolation)
  return tf.ensure_shape(crop, (image_size, image_size, 3))


def random_erasing(
  image: tf.Tensor,
  seed: tf.Tensor,
  prob: float,
  area: tuple[float, float] = (0.02, 1 / 3),
  aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> tf.Tensor:
  """timm's RandomErasing(prob, mode='pixel', max_count=1) on a normalised image [H, W, C].

  With probability prob, the first of 10 (area, log-uniform aspect) boxes that fits strictly
  inside is filled with per-pixel standard-normal noise; if none fits, nothing is erased.
  """
  seed_apply, seed_box, seed_pos, seed_noise = tf.unstack(
    tf.random.experimental.stateless_split(seed, 4)
  )
  img_h, img_w = tf.shape(image)[0], tf.shape(image)[1]
  heights, widths = _box_sizes(seed_box, img_h * img_w, area, aspect, 10)  # [10], [10]
  fits = (widths < img_w) & (heights < img_h)  # [10]
  first = tf.argmax(tf.cast(fits, tf.int32))
  erase = (tf.random.stateless_uniform((), seed_apply) < prob) & tf.reduce_any(fits)
  h, w = heights[first], widths[first]
  top, left = tf.unstack(_randint(seed_pos, tf.stack([img_h - h, img_w - w])))
  rows = tf.range(img_h)[:, None]  # [H, 1]
  cols = tf.range(img_w)[None, :]  # [1, W]
  box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # [H, W]

  def erased() -> tf.Tensor:  # the noise is drawn only for the images erased
    noise = tf.random.stateless_normal(tf.shape(image), seed_noise, dtype=image.dtype)
    return tf.where(box[..., None], noise, image)

  return tf.cond(erase, erased, lambda: image)


def train_image(
  image: tf.Tensor, seed: tf.Tensor, image_size: int, aug: ml_collections.ConfigDict
) -> tf.Tensor:
  """DeiT's train transform: image uint8 [h, w, 3], seed int [2] -> float32 [S, S, 3].

  timm's create_transform(is_training=True) order: random-resized-crop (bicubic), flip,
  RandAugment on the uint8 image, normalise, random erasing. Each draws from its own split seed.
  """
  seed = tf.cast(seed, tf.int64)  # stateless_split's draws depend on the seed's dtype
  seeds = tf.random.experimental.stateless_split(seed, 4)
  if aug.random_resized_crop:
    image = random_resized_crop(image, seeds[0], image_size, tuple(aug.rrc_scale))
  else:
    image = resize_like_pil(image, (image_size, image_size))
    image = tf.ensure_shape(image, (image_size, image_size, 3))
  if aug.hflip > 0:
    flip = tf.random.stateless_uniform((), seeds[1]) < aug.hflip
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
  if aug.randaugment_num_ops > 0:
    image = randaugment.rand_augment(
      image,
      seeds[2],
      aug.randaugment_num_ops,
      aug.randaugment_magnitude,
      aug.randaugment_mstd,
    )
  image = normalize(image)
  if aug.random_erasing > 0:
    image = random_erasing(image, seeds[3], aug.random_erasing)
  return image
