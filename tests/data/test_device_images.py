"""The device half of preprocessing: normalisation and random erasing's noise in the jitted step."""

from __future__ import annotations

import jax
import numpy as np

from ats_jax.data import device_images, images
from ats_jax.models import registry


def test_one_normaliser_jitted_and_on_the_host_equals_a_float64_oracle():
  pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  assert device_images.normalize is images.normalize  # one implementation for every path
  for mean, std in [(registry.IMAGENET_MEAN, registry.IMAGENET_STD), ((0.5,) * 3,) * 2]:
    oracle = (pixels / 255.0 - np.asarray(mean)) / np.asarray(std)  # float64
    jitted = jax.jit(images.normalize, static_argnums=(1, 2))(pixels, mean, std)
    host = images.normalize(pixels, mean, std)
    assert jitted.dtype == host.dtype == np.float32
    for got in (np.asarray(jitted), host):  # XLA may divide by multiplying: float32 rounding
      np.testing.assert_allclose(got, oracle, atol=1e-6, rtol=0)


def test_erase_fills_each_box_with_noise_and_nothing_else():
  images = np.zeros((3, 10, 12, 3), np.float32)
  boxes = np.array([[2, 3, 4, 5], [0, 0, 0, 0], [9, 11, 1, 1]], np.int32)  # h = 0: none
  got = np.asarray(device_images.erase(images, boxes, jax.random.key(0)))
  changed = got != 0  # [3, 10, 12, 3]
  assert changed[0, 2:6, 3:8].all() and changed[0].sum() == 4 * 5 * 3
  assert not changed[1].any()
  assert changed[2, 9, 11].all() and changed[2].sum() == 3
  noise = got[0, 2:6, 3:8]
  assert abs(noise.mean()) < 1.0 and 0.3 < noise.std() < 2.0  # standard normal draws
