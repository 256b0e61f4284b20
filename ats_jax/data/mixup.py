"""Mixup / CutMix with label smoothing on device, as timm's `Mixup` in 'batch' mode (DeiT).

Each batch draws one lambda; when both are on, CutMix or Mixup is chosen with probability 1/2. As
timm flips each GPU's batch, each process' share of the global batch (`num_groups` contiguous
chunks, one per process) is mixed with itself reversed: partners never cross hosts. Targets become
smoothed one-hot vectors mixed the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm's targets: on = 1 - smoothing + smoothing / classes, off = smoothing / classes."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
  """A box covering about 1 - lam of the image, centred uniformly, clipped: mask [H, W] bool."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (cut * height).astype(jnp.int32), (cut * width).astype(jnp.int32)
  cy = jax.random.randint(jax.random.fold_in(rng, 0), (), 0, height)
  cx = jax.random.randint(jax.random.fold_in(rng, 1), (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


def partners(x: jax.Array, num_groups: int) -> jax.Array:
  """x [B, ...] with each of `num_groups` contiguous chunks of the batch reversed."""
  b = x.shape[0]
  if b % num_groups:
    raise ValueError(f'a batch of {b} does not split into {num_groups} equal groups')
  grouped = x.reshape(num_groups, b // num_groups, *x.shape[1:])  # [G, B / G, ...]
  return grouped[:, ::-1].reshape(x.shape)


def mix(
  rng: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  num_classes: int,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
  smoothing: float,
  num_groups: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """images [B, H, W, C], labels [B] int -> mixed images and soft targets [B, classes].

  Image i of a group is mixed with the group's image from the other end; train_step passes the
  process count as num_groups.
  """
  targets = smooth_one_hot(labels, num_classes, smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  rng_switch, rng_mixup, rng_cutmix, rng_box = jax.random.split(rng, 4)
  flipped = partners(images, num_groups)
  a_mixup, a_cutmix = max(mixup_alpha, 1e-6), max(cutmix_alpha, 1e-6)  # unused when <= 0
  lam_mixup = jax.random.beta(rng_mixup, a_mixup, a_mixup)
  lam_cutmix = jax.random.beta(rng_cutmix, a_cutmix, a_cutmix)
  if cutmix_alpha <= 0:
    use_cutmix = jnp.array(False)
  elif mixup_alpha <= 0:
    use_cutmix = jnp.array(True)
  else:
    use_cutmix = jax.random.uniform(rng_switch) < 0.5  # timm's switch_prob
  h, w = images.shape[1:3]
  box = cutmix_box(rng_box, lam_cutmix, h, w)  # [H, W]
  lam = jnp.where(use_cutmix, 1.0 - box.mean(), lam_mixup)  # cutmix: lam from the clipped area
  mixed = jnp.where(
    use_cutmix,
    jnp.where(box[None, :, :, None], flipped, images),
    lam_mixup * images + (1.0 - lam_mixup) * flipped,
  )
  return mixed.astype(images.dtype), lam * targets + (1.0 - lam) * partners(targets, num_groups)
