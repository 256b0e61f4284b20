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


CROP_MARGIN = 16  # pixels decoded around a JPEG crop: a 4:2:0 MCU; see decode_crop


def _plain_jpeg(data: tf.Tensor) -> tf.Tensor:
  """True for a JPEG that TF decodes as PIL does (3 components or grey, not CMYK/YCCK)."""
  return tf.cond(
    tf.image.is_jpeg(data),
    lambda: tf.io.extract_jpeg_shape(data)[2] != 4,
    lambda: tf.constant(False),
  )


def encoded_shape(data: tf.Tensor) -> tf.Tensor:
  """(height, width) int32 [2] of encoded image bytes: a JPEG's read from its header alone."""
  return tf.cond(
    _plain_jpeg(data),
    lambda: tf.io.extract_jpeg_shape(data)[:2],
    lambda: tf.shape(decode_image(data))[:2],
  )


def decode_crop(data: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
  """The pixels decode_image(data)[top : top + h, left : left + w] for box int32 [4] (top, left,
  h, w), decoding only the rows and columns around the box where the file is a plain JPEG.

  libjpeg upsamples chroma from neighbouring samples, which a crop decoded alone lacks at its
  edges (1-7 levels apart there in ~1/3 of crops): the window decoded reaches CROP_MARGIN pixels
  beyond the box on each side, then the box is cut from it, giving decode_image's exact pixels.
  """
  top, left, h, w = tf.unstack(box)

  def jpeg() -> tf.Tensor:
    img_h, img_w = tf.unstack(tf.io.extract_jpeg_shape(data)[:2])
    y0, x0 = tf.maximum(top - CROP_MARGIN, 0), tf.maximum(left - CROP_MARGIN, 0)
    y1 = tf.minimum(top + h + CROP_MARGIN, img_h)
    x1 = tf.minimum(left + w + CROP_MARGIN, img_w)
    window = tf.stack([y0, x0, y1 - y0, x1 - x0])
    image = tf.image.decode_and_crop_jpeg(data, window, channels=3, dct_method='INTEGER_ACCURATE')
    return image[top - y0 : top - y0 + h, left - x0 : left - x0 + w]

  def other() -> tf.Tensor:
    return decode_image(data)[top : top + h, left : left + w]

  image = tf.cond(_plain_jpeg(data), jpeg, other)
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


def eval_pixels(
  image: tf.Tensor, image_size: int, crop_pct: float = 0.875, interpolation: str = 'bicubic'
) -> tf.Tensor:
  """DeiT eval up to normalisation: shorter side to image_size / crop_pct (256 for 224), centre
  crop. image uint8 [h, w, 3] -> uint8 [image_size, image_size, 3]."""
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
  return tf.cast(tf.ensure_shape(image, (image_size, image_size, 3)), tf.uint8)


def eval_image(
  image: tf.Tensor,
  image_size: int,
  crop_pct: float = 0.875,
  interpolation: str = 'bicubic',
  mean: tuple = IMAGENET_MEAN,
  std: tuple = IMAGENET_STD,
) -> tf.Tensor:
  """DeiT eval, normalised: image uint8 [h, w, 3] -> float32 [image_size, image_size, 3].

  The defaults are DeiT's; a checkpoint records its own (`registry.DataConfig`). Eval batches
  carry eval_pixels; the jitted step normalises them (`device_images.normalize`).
  """
  return normalize(eval_pixels(image, image_size, crop_pct, interpolation), mean, std)


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
  """timm's RandomResizedCropAndInterpolation: float32 [S, S, 3] of whole numbers in 0..255.

  `image` is uint8 pixels [h, w, 3], or the encoded file (a string scalar): then the box is drawn
  from the JPEG header's size and only the box is decoded (decode_crop), to the same pixels.
  """
  encoded = image.dtype == tf.string
  shape = encoded_shape(image) if encoded else tf.shape(image)[:2]
  box = crop_box(seed, shape[0], shape[1], scale, ratio)
  if encoded:
    crop = decode_crop(image, box)
  else:
    top, left, h, w = tf.unstack(box)
    crop = image[top : top + h, left : left + w]
  crop = resize_like_pil(crop, (image_size, image_size), interpolation)
  return tf.ensure_shape(crop, (image_size, image_size, 3))


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


def random_erasing(
  image: tf.Tensor,
  seed: tf.Tensor,
  prob: float,
  area: tuple[float, float] = (0.02, 1 / 3),
  aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> tf.Tensor:
  """timm's RandomErasing(prob, mode='pixel', max_count=1) on a normalised image [H, W, C]: the
  erasing_box filled with per-pixel standard-normal noise. (Training batches carry the box, and
  the jitted step draws the noise on the device: `device_images.erase`.)"""
  img_h, img_w = tf.shape(image)[0], tf.shape(image)[1]
  top, left, h, w = tf.unstack(erasing_box(seed, img_h, img_w, prob, area, aspect))
  rows = tf.range(img_h)[:, None]  # [H, 1]
  cols = tf.range(img_w)[None, :]  # [1, W]
  box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # [H, W]
  seed_noise = tf.random.experimental.stateless_split(seed, 4)[3]

  def erased() -> tf.Tensor:  # the noise is drawn only for the images erased
    noise = tf.random.stateless_normal(tf.shape(image), seed_noise, dtype=image.dtype)
    return tf.where(box[..., None], noise, image)

  return tf.cond(h > 0, erased, lambda: image)


def train_pixels(
  image: tf.Tensor, seed: tf.Tensor, image_size: int, aug: ml_collections.ConfigDict
) -> tuple[tf.Tensor, tf.Tensor]:
  """DeiT's train transform up to normalisation: what the input pipeline sends to the device.

  image uint8 [h, w, 3], or the encoded file (only the crop is decoded); seed int [2] ->
  (uint8 [S, S, 3], random erasing's box int32 [4] (top, left, h, w; h = 0: none)). timm's
  create_transform(is_training=True) order: random-resized-crop (bicubic), flip, RandAugment on the
  uint8 image; then, on the device, normalise and random erasing (`device_images`).
  """
  seed = tf.cast(seed, tf.int64)  # stateless_split's draws depend on the seed's dtype
  seeds = tf.random.experimental.stateless_split(seed, 4)
  if aug.random_resized_crop:
    image = random_resized_crop(image, seeds[0], image_size, tuple(aug.rrc_scale))
  else:
    if image.dtype == tf.string:
      image = decode_image(image)
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
  box = erasing_box(seeds[3], image_size, image_size, aug.random_erasing)
  return tf.cast(image, tf.uint8), box


def train_image(
  image: tf.Tensor, seed: tf.Tensor, image_size: int, aug: ml_collections.ConfigDict
) -> tf.Tensor:
  """DeiT's whole train transform in TensorFlow: image uint8 [h, w, 3], seed int [2] -> float32
  [S, S, 3] normalised, erased with noise drawn here (the reference for train_pixels + the
  device's half, which draws its own noise)."""
  pixels, _ = train_pixels(image, seed, image_size, aug)
  image = normalize(pixels)
  if aug.random_erasing > 0:
    seed = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)[3]
    image = random_erasing(image, seed, aug.random_erasing)
  return image
