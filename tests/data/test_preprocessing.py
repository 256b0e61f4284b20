"""DeiT's transforms against timm's: the same pixels on the same draws, and the draws' statistics.

timm (with torchvision) must be imported before TensorFlow or the import segfaults; conftest.py
imports timm first, so these tests rely on running under pytest with it.
"""

from __future__ import annotations

import io
import math
import random
from unittest import mock

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import auto_augment, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import InterpolationMode

from ats_jax.data import images, preprocessing, randaugment


@pytest.fixture(scope='module')
def photo() -> np.ndarray:
  """china.jpg (427 x 640) as uint8 [H, W, 3]."""
  return load_sample_image('china.jpg')


@pytest.fixture(scope='module')
def small_photo(photo) -> np.ndarray:
  """A non-square 120 x 160 photo with its contrast lowered, so AutoContrast has work to do."""
  small = np.asarray(Image.fromarray(photo).resize((160, 120), Image.BICUBIC), np.float32)
  return np.round(small * 0.8 + 20).astype(np.uint8)


def aug_config(**overrides) -> ml_collections.ConfigDict:
  """configs/default.py's aug with everything off, then `overrides`."""
  aug = ml_collections.ConfigDict(
    dict(
      random_resized_crop=False,
      rrc_scale=(0.08, 1.0),
      hflip=0.0,
      randaugment_num_ops=0,
      randaugment_magnitude=9.0,
      randaugment_mstd=0.5,
      random_erasing=0.0,
    )
  )
  aug.update(overrides)
  return aug


def seed_dataset(fn, count: int) -> tf.data.Dataset:
  """fn(seed) for seeds [i, 7], i < count, inside tf.data.Dataset.map (graph mode)."""
  return tf.data.Dataset.range(count).map(lambda i: fn(tf.stack([i, tf.constant(7, tf.int64)])))


def map_seeds(fn, count: int) -> np.ndarray | tuple[np.ndarray, ...]:
  """fn over `count` seeds (`seed_dataset`), stacked (each part stacked when fn returns a tuple)."""
  items = list(seed_dataset(fn, count).as_numpy_iterator())
  if isinstance(items[0], tuple):
    return tuple(np.stack(part) for part in zip(*items, strict=True))
  return np.stack(items)


def binomial_ok(hits: int, n: int, p: float, sigmas: float = 4.0) -> bool:
  return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


# RandAugment ops, one at a fixed magnitude and sign, against timm's AugmentOp.


@pytest.mark.parametrize('negate', [False, True])
@pytest.mark.parametrize('magnitude', [9.0, 4.3])
@pytest.mark.parametrize('name', randaugment.OP_NAMES)
def test_op_equals_timms(small_photo, monkeypatch, name, magnitude, negate):
  hparams = dict(img_mean=randaugment.FILL, interpolation=Image.BICUBIC, translate_const=100)
  op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
  monkeypatch.setattr(random, 'random', lambda: 1.0 if negate else 0.0)  # _randomly_negate's coin
  expected = np.asarray(op(Image.fromarray(small_photo)))
  assert np.abs(expected.astype(float) - small_photo).mean() > 1.0  # the op does something here
  index = randaugment.OP_NAMES.index(name)
  got = randaugment.apply_op(Image.fromarray(small_photo), index, magnitude, negate)
  np.testing.assert_array_equal(np.asarray(got), expected)


def test_skip_index_is_identity(small_photo):
  got = randaugment.apply_op(Image.fromarray(small_photo), len(randaugment.OP_NAMES), 9.0, False)
  np.testing.assert_array_equal(np.asarray(got), small_photo)


def test_posterize_zero_bits_is_black(small_photo):
  """timm's level 10 keeps 0 bits: black, as older Pillow gives (Pillow 13's posterize raises)."""
  got = randaugment.apply_op(Image.fromarray(small_photo), 4, 10.0, False)  # PosterizeIncreasing
  assert np.all(np.asarray(got) == 0)


def test_sample_ops_statistics():
  n = 6000
  index, mags, negate = (
    t.numpy() for t in randaugment.sample_ops(tf.constant([3, 4]), n, 9.8, 0.5, prob=0.5)
  )
  counts = np.bincount(index, minlength=16)
  assert binomial_ok(counts[15], n, 0.5)  # skipped: timm's prob 0.5
  assert all(binomial_ok(c, n, 0.5 / 15) for c in counts[:15])  # uniform over the 15 ops
  assert mags.min() >= 0.0 and mags.max() == 10.0  # clipped to [0, 10] as timm
  clipped = np.sum(mags == 10.0)
  assert binomial_ok(clipped, n, 0.5 * math.erfc(0.4 / math.sqrt(2)))  # P(N(9.8, .5) > 10)
  unclipped = mags[mags < 10.0]
  assert abs(np.median(mags) - 9.8) < 0.03
  assert unclipped.min() < 8.5  # a Gaussian's tail, not a constant
  assert binomial_ok(negate.sum(), n, 0.5)


# The whole transforms against timm's, on the same draws.


@pytest.mark.parametrize('crop', [None, (300, 250), (250, 500)])
@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear'])
def test_eval_pixels_normalised_equal_timms(photo, crop, interpolation):
  image = photo if crop is None else photo[: crop[0], : crop[1]]
  transform = create_transform(224, is_training=False, interpolation=interpolation, crop_pct=0.875)
  expected = transform(Image.fromarray(image)).permute(1, 2, 0).numpy()
  pixels = preprocessing.eval_pixels(tf.constant(image), 224, interpolation=interpolation).numpy()
  got = images.normalize(pixels)
  assert got.shape == (224, 224, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)  # the same pixels, normalised


def test_eval_pixels_refuses_an_unknown_interpolation(photo):
  with pytest.raises(ValueError, match="interpolation must be one of .* got 'cubic'"):
    preprocessing.eval_pixels(tf.constant(photo), 224, interpolation='cubic')


def timm_train_pixels(photo: np.ndarray, draws: dict, size: int) -> np.ndarray:
  """timm's train transform up to ToTensor (RandomResizedCropAndInterpolation, flip,
  RandAugment's AugmentOps) with its random choices replaced by `draws`."""
  top, left, h, w = (int(v) for v in draws['box'])
  image = torchvision.transforms.functional.resized_crop(
    Image.fromarray(photo), top, left, h, w, [size, size], InterpolationMode.BICUBIC
  )
  if draws['flip']:
    image = torchvision.transforms.functional.hflip(image)
  hparams = dict(img_mean=randaugment.FILL, interpolation=Image.BICUBIC)
  layers = zip(draws['op_index'], draws['magnitude'], draws['negate'], strict=True)
  for index, magnitude, negate in layers:
    if index == len(randaugment.OP_NAMES):
      continue  # the op's coin said no
    name = randaugment.OP_NAMES[index]
    op = auto_augment.AugmentOp(name, prob=1.0, magnitude=float(magnitude), hparams=hparams)
    with mock.patch.object(random, 'random', lambda n=bool(negate): 1.0 if n else 0.0):
      image = op(image)
  return np.asarray(image)


def test_train_pixels_equal_timms_on_the_same_draws(photo):
  aug = aug_config(random_resized_crop=True, hflip=0.5, randaugment_num_ops=2, random_erasing=0.25)
  image = tf.constant(photo)
  ops_seen = set()
  for i in range(24):
    seed = tf.constant([i, 3])
    got, erase = preprocessing.train_pixels(image, seed, 64, aug)
    draws = {
      k: v.numpy() for k, v in preprocessing.train_draws(seed, photo.shape[:2], 64, aug).items()
    }
    np.testing.assert_array_equal(got.numpy(), timm_train_pixels(photo, draws, 64))
    np.testing.assert_array_equal(erase.numpy(), draws['erase'])
    ops_seen.update(draws['op_index'].tolist())
  assert len(ops_seen) >= 8  # many ops, and the skip, took part


def test_train_pixels_from_the_encoded_file_equal_those_from_its_pixels(photo):
  data = io.BytesIO()
  Image.fromarray(photo).save(data, format='JPEG', quality=90)
  decoded = np.asarray(Image.open(io.BytesIO(data.getvalue())).convert('RGB'))
  aug = aug_config(random_resized_crop=True, hflip=0.5, randaugment_num_ops=2)
  for i in range(4):
    seed = tf.constant([i, 0])
    from_bytes, _ = preprocessing.train_pixels(tf.constant(data.getvalue()), seed, 48, aug)
    from_pixels, _ = preprocessing.train_pixels(tf.constant(decoded), seed, 48, aug)
    np.testing.assert_array_equal(from_bytes.numpy(), from_pixels.numpy())


def close_means(a: np.ndarray, b: np.ndarray, sigmas: float = 4.0) -> bool:
  """Two samples' means agree within `sigmas` standard errors of their difference."""
  se = math.sqrt(a.var() / len(a) + b.var() / len(b))
  return abs(a.mean() - b.mean()) <= sigmas * se


@pytest.mark.parametrize(
  'h, w, ratio',
  [
    (100, 400, (3 / 4, 4 / 3)),  # wide: many tries fail, the fallback and the fit test matter
    (300, 300, (1 / 5, 5)),  # a wide ratio range: log-uniform, not uniform
  ],
)
def test_crop_box_statistics_match_timm(h, w, ratio):
  n = 3000
  boxes = map_seeds(
    lambda s: preprocessing.crop_box(s, tf.constant(h), tf.constant(w), (0.08, 1.0), ratio), n
  )
  random.seed(0)
  dummy = Image.new('RGB', (w, h))
  get_params = RandomResizedCropAndInterpolation.get_params
  timm_boxes = np.array([get_params(dummy, (0.08, 1.0), ratio) for _ in range(n)])
  top, left, bh, bw = boxes.T
  assert np.all((top >= 0) & (left >= 0) & (top + bh <= h) & (left + bw <= w))
  area, timm_area = (b[:, 2] * b[:, 3] / (h * w) for b in (boxes, timm_boxes))
  assert close_means(area, timm_area), (area.mean(), timm_area.mean())
  log_aspect, timm_log_aspect = (np.log(b[:, 3] / b[:, 2]) for b in (boxes, timm_boxes))
  assert close_means(log_aspect, timm_log_aspect), (log_aspect.mean(), timm_log_aspect.mean())
  whole, timm_whole = (np.mean((b[:, 2] == h) & (b[:, 3] >= 0.9 * w)) for b in (boxes, timm_boxes))
  assert binomial_ok(round(whole * n), n, max(timm_whole, 1 / n))  # ~whole-width boxes, fallback


def test_crop_box_fallback_matches_timm():
  dummy = Image.new('RGB', (400, 100))
  for scale, ratio in [((1.0, 1.0), (1.0, 1.0)), ((0.9, 1.0), (0.5, 0.6))]:  # never fits
    box = preprocessing.crop_box(
      tf.constant([0, 1]), tf.constant(100), tf.constant(400), scale, ratio
    )
    expected = RandomResizedCropAndInterpolation.get_params(dummy, scale, ratio)
    np.testing.assert_array_equal(box.numpy(), expected)  # the centre, ratio clamped


# Random erasing's boxes against timm's RandomErasing (the device fills them: test_device_images).


def erased_boxes(images: np.ndarray) -> list[tuple[int, int]]:
  """(height, width) of the erased rectangle of each image of zeros (None if untouched)."""
  out = []
  for image in images:
    mask = np.any(image != 0, axis=-1)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not rows.size:
      out.append(None)
      continue
    box = (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    assert mask.sum() == box[0] * box[1]  # a filled rectangle
    out.append(box)
  return out


def test_erasing_box_matches_timm_statistics():
  n, size = 600, 40
  rate = map_seeds(lambda s: preprocessing.erasing_box(s, size, size, 0.25), n)
  assert binomial_ok(np.sum(rate[:, 2] > 0), n, 0.25)

  ours = map_seeds(lambda s: preprocessing.erasing_box(s, size, size, 1.0), n)
  top, left, h, w = ours.T
  assert np.all((top >= 0) & (left >= 0) & (top + h <= size) & (left + w <= size))
  random.seed(0)
  torch.manual_seed(0)
  erase = RandomErasing(1.0, mode='pixel', max_count=1, device='cpu')
  theirs = [erase(torch.zeros(3, size, size)).permute(1, 2, 0).numpy() for _ in range(n)]
  boxes, timm_boxes = ours[h > 0][:, 2:], np.array([b for b in erased_boxes(theirs) if b])
  assert binomial_ok(len(boxes), n, len(timm_boxes) / n)  # ~all: 10 tries rarely all fail
  area, timm_area = (b[:, 0] * b[:, 1] / size**2 for b in (boxes, timm_boxes))
  assert 0.015 <= area.min() and area.max() <= 0.36  # [0.02, 1/3] up to rounding of h and w
  assert close_means(area, timm_area), (area.mean(), timm_area.mean())
  log_aspect, timm_log_aspect = (np.log(b[:, 0] / b[:, 1]) for b in (boxes, timm_boxes))
  assert close_means(log_aspect, timm_log_aspect), (log_aspect.mean(), timm_log_aspect.mean())


# train_pixels: determinism, graph mode, the all-off identity, rates.


def resized(photo: np.ndarray, size: int) -> np.ndarray:
  """Every augmentation off: PIL's bicubic resize of the whole image."""
  return np.asarray(Image.fromarray(photo).resize((size, size), Image.BICUBIC))


def test_train_pixels_deterministic_per_seed_in_graph_and_eager_mode(photo):
  aug = aug_config(random_resized_crop=True, hflip=0.5, randaugment_num_ops=2, random_erasing=0.25)
  image = tf.constant(photo)
  a, box_a = preprocessing.train_pixels(image, tf.constant([1, 2]), 64, aug)
  b, box_b = preprocessing.train_pixels(image, tf.constant([1, 2], tf.int64), 64, aug)
  c, _ = preprocessing.train_pixels(image, tf.constant([1, 3]), 64, aug)
  assert a.shape == (64, 64, 3) and a.dtype == tf.uint8
  np.testing.assert_array_equal(a.numpy(), b.numpy())
  np.testing.assert_array_equal(box_a.numpy(), box_b.numpy())
  assert np.abs(a.numpy().astype(float) - c.numpy()).mean() > 1.0

  def shifted(seed: tf.Tensor) -> tf.Tensor:
    return preprocessing.train_pixels(image, seed + tf.constant([1, 2], tf.int64), 64, aug)[0]

  dataset = seed_dataset(shifted, 3)
  first, second = (np.stack(list(dataset.as_numpy_iterator())) for _ in range(2))
  np.testing.assert_array_equal(first, second)
  eager = preprocessing.train_pixels(image, tf.constant([1, 9], tf.int64), 64, aug)[0].numpy()
  np.testing.assert_array_equal(first[0], eager)  # seed [0, 7] + [1, 2]


def test_train_pixels_all_off_is_the_resized_image(photo):
  got, box = preprocessing.train_pixels(tf.constant(photo), tf.constant([0, 0]), 48, aug_config())
  np.testing.assert_array_equal(got.numpy(), resized(photo, 48))
  np.testing.assert_array_equal(box.numpy(), [0, 0, 0, 0])  # no erasing


def test_train_pixels_flip_erasing_and_randaugment_rates(photo):
  n, size = 400, 24
  image = tf.constant(photo)
  aug = aug_config(hflip=0.5, random_erasing=0.25)
  outs = map_seeds(lambda s: preprocessing.train_pixels(image, s, size, aug), n)
  pixels, boxes = outs
  base = resized(photo, size)
  flipped = np.all(pixels == base[:, ::-1], axis=(1, 2, 3))
  assert np.all(flipped | np.all(pixels == base, axis=(1, 2, 3)))  # nothing else changed
  assert binomial_ok(flipped.sum(), n, 0.5), flipped.mean()
  assert binomial_ok(np.sum(boxes[:, 2] > 0), n, 0.25)

  aug = aug_config(randaugment_num_ops=2)
  pixels, _ = map_seeds(lambda s: preprocessing.train_pixels(image, s, size, aug), 40)
  changed = np.any(pixels != base, axis=(1, 2, 3))
  assert 0.4 <= changed.mean() < 1.0  # 3/4 draw at least one op; a few ops may be no-ops
