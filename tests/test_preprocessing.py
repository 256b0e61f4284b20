"""DeiT's augmentations in TF against timm/PIL, and the stateless train pipeline's statistics.

timm (with torchvision) must be imported before TensorFlow or the import segfaults; conftest.py
imports timm first, so these tests rely on running under pytest with it.
"""

from __future__ import annotations

import math
import random

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import auto_augment, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

from ats_jax import preprocessing, randaugment

STD_LEVELS = 255 * np.array(preprocessing.IMAGENET_STD)  # one normalised unit, in 0..255 levels
GEOMETRIC = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'}


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


def map_seeds(fn, count: int) -> np.ndarray:
  return np.stack(list(seed_dataset(fn, count).as_numpy_iterator()))


def binomial_ok(hits: int, n: int, p: float, sigmas: float = 4.0) -> bool:
  return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


# RandAugment ops, one at a fixed magnitude and sign, against timm's AugmentOp on PIL.


@pytest.mark.parametrize('negate', [False, True])
@pytest.mark.parametrize('magnitude', [9.0, 4.3])
@pytest.mark.parametrize('name', randaugment.OP_NAMES)
def test_op_matches_timm(small_photo, monkeypatch, name, magnitude, negate):
  hparams = dict(img_mean=randaugment.FILL, interpolation=Image.BICUBIC, translate_const=100)
  op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
  monkeypatch.setattr(random, 'random', lambda: 1.0 if negate else 0.0)  # _randomly_negate's coin
  expected = np.asarray(op(Image.fromarray(small_photo)), np.float32)
  assert np.abs(expected - small_photo).mean() > 1.0  # the op does something here

  image = tf.constant(small_photo, tf.float32)
  index = randaugment.OP_NAMES.index(name)
  got = randaugment.apply_op(image, tf.constant(index), magnitude, tf.constant(negate)).numpy()
  diff = np.abs(got - expected)
  if name in GEOMETRIC:
    # PIL's bicubic, summed in float32 (PIL: double): measured, a truncation flipped by one level
    # for up to 0.2% of values (float64: ~1e-5)
    assert diff.max() <= 1 and np.mean(diff > 0) <= 4e-3, (diff.max(), np.mean(diff > 0))
  else:
    np.testing.assert_array_equal(got, expected)


def test_skip_index_is_identity(small_photo):
  image = tf.constant(small_photo, tf.float32)
  skip = tf.constant(len(randaugment.OP_NAMES))
  got = randaugment.apply_op(image, skip, 9.0, tf.constant(False))
  np.testing.assert_array_equal(got.numpy(), small_photo)


def test_posterize_zero_bits_is_black(small_photo):
  """timm's level 10 keeps 0 bits: black, as older Pillow gives (Pillow 13's posterize raises)."""
  got = randaugment.posterize(tf.constant(small_photo, tf.float32), tf.constant(0.0, tf.float64))
  assert np.all(got.numpy() == 0)


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


def test_rand_augment_deterministic_per_seed(small_photo):
  image = tf.constant(small_photo, tf.float32)
  outs = [randaugment.rand_augment(image, tf.constant([s, 0])).numpy() for s in range(12)]
  again = randaugment.rand_augment(image, tf.constant([5, 0])).numpy()
  np.testing.assert_array_equal(outs[5], again)
  changed = [not np.array_equal(o, small_photo) for o in outs]
  assert 2 <= sum(changed) <= 11  # P(two skips) = 1/4: some seeds leave the image alone
  for out in outs:
    assert out.min() >= 0 and out.max() <= 255 and np.all(out == np.round(out))  # uint8 values


# Crops and resizing against timm's transforms.


@pytest.mark.parametrize('crop', [None, (300, 250), (250, 500)])
def test_eval_image_matches_timm(photo, crop):
  image = photo if crop is None else photo[: crop[0], : crop[1]]
  transform = create_transform(224, is_training=False, interpolation='bicubic', crop_pct=0.875)
  expected = transform(Image.fromarray(image)).permute(1, 2, 0).numpy()
  got = preprocessing.eval_image(tf.constant(image), 224).numpy()
  assert got.shape == (224, 224, 3) and got.dtype == np.float32
  levels = np.abs(got - expected) * STD_LEVELS
  # PIL's two resize passes reproduced: measured <= 1 level at < 1e-3 of values, mean 4e-4
  assert levels.max() <= 1.001 and levels.mean() <= 0.005, (levels.max(), levels.mean())


@pytest.mark.parametrize(
  'shape, square, mean_tol, max_tol',
  [
    ((427, 640), False, 0.005, 1),  # the whole image
    ((427, 640), True, 0.005, 1),  # no 1:1 box fits: timm's centre-crop fallback
    ((400, 200), True, 0.005, 1),
    # Pillow 13 resizes this one columns first (older Pillow: rows first, as we do): ~0.17, 6
    ((400, 200), False, 0.25, 8),
  ],
)
def test_random_resized_crop_matches_timm_when_deterministic(
  photo, shape, square, mean_tol, max_tol
):
  """scale (1, 1) at the image's ratio takes the whole image; at ratio 1, timm's fallback."""
  image = photo[: shape[0], : shape[1]]
  ratio = (1.0, 1.0) if square else (shape[1] / shape[0],) * 2
  timm_rrc = RandomResizedCropAndInterpolation(224, (1.0, 1.0), ratio, interpolation='bicubic')
  expected = np.asarray(timm_rrc(Image.fromarray(image)), np.float32)
  got = preprocessing.random_resized_crop(
    tf.constant(image), tf.constant([1, 2]), 224, (1.0, 1.0), ratio
  ).numpy()
  diff = np.abs(got - expected)
  assert diff.mean() <= mean_tol and diff.max() <= max_tol, (diff.mean(), diff.max())


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


# Random erasing against timm's RandomErasing.


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


def test_random_erasing_matches_timm_statistics():
  n, size = 600, 40
  zeros = tf.zeros((size, size, 3))
  rate = map_seeds(lambda s: preprocessing.random_erasing(zeros, s, 0.25), n)
  assert binomial_ok(sum(b is not None for b in erased_boxes(rate)), n, 0.25)

  ours = map_seeds(lambda s: preprocessing.random_erasing(zeros, s, 1.0), n)
  random.seed(0)
  torch.manual_seed(0)
  erase = RandomErasing(1.0, mode='pixel', max_count=1, device='cpu')
  theirs = [erase(torch.zeros(3, size, size)).permute(1, 2, 0).numpy() for _ in range(n)]
  boxes, timm_boxes = (np.array([b for b in erased_boxes(x) if b]) for x in (ours, theirs))
  assert binomial_ok(len(boxes), n, len(timm_boxes) / n)  # ~all: 10 tries rarely all fail
  area, timm_area = (b[:, 0] * b[:, 1] / size**2 for b in (boxes, timm_boxes))
  assert 0.015 <= area.min() and area.max() <= 0.36  # [0.02, 1/3] up to rounding of h and w
  assert close_means(area, timm_area), (area.mean(), timm_area.mean())
  log_aspect, timm_log_aspect = (np.log(b[:, 0] / b[:, 1]) for b in (boxes, timm_boxes))
  assert close_means(log_aspect, timm_log_aspect), (log_aspect.mean(), timm_log_aspect.mean())
  values = ours[ours != 0]
  assert abs(values.mean()) < 0.05 and abs(values.std() - 1.0) < 0.05  # per-pixel N(0, 1)


# train_image: determinism, the all-off identity, statistics, graph mode.


def base_image(photo: np.ndarray, size: int) -> np.ndarray:
  """Every augmentation off: PIL-like bicubic resize (uint8), normalised."""
  return preprocessing.normalize(preprocessing.resize_like_pil(photo, (size, size))).numpy()


def test_train_image_deterministic_per_seed(photo):
  aug = aug_config(random_resized_crop=True, hflip=0.5, randaugment_num_ops=2, random_erasing=0.25)
  image = tf.constant(photo)
  a = preprocessing.train_image(image, tf.constant([1, 2]), 64, aug).numpy()
  b = preprocessing.train_image(image, tf.constant([1, 2], tf.int64), 64, aug).numpy()
  c = preprocessing.train_image(image, tf.constant([1, 3]), 64, aug).numpy()
  assert a.shape == (64, 64, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).mean() > 0.1

  # graph mode inside tf.data gives the same bits as eager, and a second pass the same again
  def shifted(seed: tf.Tensor) -> tf.Tensor:
    return preprocessing.train_image(image, seed + tf.constant([1, 2], tf.int64), 64, aug)

  dataset = seed_dataset(shifted, 3)
  first, second = (np.stack(list(dataset.as_numpy_iterator())) for _ in range(2))
  np.testing.assert_array_equal(first, second)
  eager = preprocessing.train_image(image, tf.constant([1, 9], tf.int64), 64, aug).numpy()
  np.testing.assert_array_equal(first[0], eager)  # seed [0, 7] + [1, 2]


def test_train_image_all_off_is_resize_and_normalise(photo):
  got = preprocessing.train_image(tf.constant(photo), tf.constant([0, 0]), 48, aug_config())
  np.testing.assert_array_equal(got.numpy(), base_image(photo, 48))
  pil = np.asarray(Image.fromarray(photo).resize((48, 48), Image.BICUBIC), np.float32)
  expected = (pil / 255 - preprocessing.IMAGENET_MEAN) / preprocessing.IMAGENET_STD
  assert np.max(np.abs(got.numpy() - expected) * STD_LEVELS) <= 1.001  # PIL's, to a level


def test_train_image_erasing_writes_noise(photo):
  got = preprocessing.train_image(
    tf.constant(photo), tf.constant([0, 5]), 48, aug_config(random_erasing=1.0)
  ).numpy()
  changed = np.any(got != base_image(photo, 48), axis=-1)
  rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
  box = got[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
  assert changed.sum() >= 0.02 * 48 * 48 * 0.9  # at least timm's minimum area
  assert changed.sum() == box.shape[0] * box.shape[1]  # one rectangle
  # noise, not the photo: de-normalised values are not whole numbers, neighbours uncorrelated
  levels = box * STD_LEVELS + 255 * np.array(preprocessing.IMAGENET_MEAN)
  assert np.mean(np.abs(levels - np.round(levels)) > 1e-3) > 0.9
  assert abs(np.corrcoef(box[:, :-1].ravel(), box[:, 1:].ravel())[0, 1]) < 0.2


def test_train_image_flip_and_erasing_rates(photo):
  n, size = 400, 24
  image = tf.constant(photo)
  aug = aug_config(hflip=0.5, random_erasing=0.25)
  outs = map_seeds(lambda s: preprocessing.train_image(image, s, size, aug), n)
  base = base_image(photo, size)
  same = np.all(outs == base, axis=-1)  # [n, S, S]
  mirrored = np.all(outs == base[:, ::-1], axis=-1)
  flipped = mirrored.sum((1, 2)) > same.sum((1, 2))
  erased = ~np.where(flipped[:, None, None], mirrored, same).all((1, 2))
  assert binomial_ok(flipped.sum(), n, 0.5), flipped.mean()
  assert binomial_ok(erased.sum(), n, 0.25), erased.mean()


def test_train_image_randaugment_wiring(photo):
  n, size = 40, 32
  image = tf.constant(photo)
  outs = map_seeds(
    lambda s: preprocessing.train_image(image, s, size, aug_config(randaugment_num_ops=2)), n
  )
  base = base_image(photo, size)
  changed = np.any(outs != base, axis=(1, 2, 3))
  assert 0.4 <= changed.mean() < 1.0  # 3/4 draw at least one op; a few ops may be no-ops
  levels = outs * STD_LEVELS + 255 * np.array(preprocessing.IMAGENET_MEAN)
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # RandAugment keeps uint8
