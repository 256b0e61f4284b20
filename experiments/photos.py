"""Real photographs for experiments, as a checkpoint's eval transform prepares them (PIL, as timm).

Noise makes every image keep about the same tokens and hides what ATS really costs: a batch of real
photos mixes busy and plain images. The photos ship inside scikit-image and scikit-learn (nothing is
downloaded); past them come random square crops and mirror images, deterministic in `seed`. The
transform is timm's own path (`ats_jax.data.images.eval_transform`: by default DeiT's PIL bicubic
resize of the short side to size / 0.875, centre crop, ImageNet mean/std; pass a model's
`data_config` for its own), so this module needs no TensorFlow.
"""

from __future__ import annotations

import functools

import numpy as np

from ats_jax.data.images import eval_transform
from ats_jax.models import registry

# scikit-image's bundled photographs (RGB and greyscale, 191 to 1,411 px), scenes and textures.
SKIMAGE_PHOTOS = (
  'astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field', 'retina', 'colorwheel',
  'immunohistochemistry', 'camera', 'coins', 'moon', 'page', 'brick', 'grass', 'gravel', 'horse',
)  # fmt: skip


@functools.cache
def originals() -> tuple[np.ndarray, ...]:
  """The bundled photographs as uint8 RGB [h, w, 3], scikit-image's then scikit-learn's two."""
  import skimage.data
  from sklearn.datasets import load_sample_images

  photos = []
  for name in SKIMAGE_PHOTOS:
    photo = np.asarray(getattr(skimage.data, name)())
    if photo.dtype != np.uint8:  # horse is a boolean silhouette
      photo = (photo > 0).astype(np.uint8) * 255
    if photo.ndim == 2:
      photo = np.repeat(photo[..., None], 3, axis=-1)
    photos.append(photo[..., :3])
  return (*photos, *load_sample_images().images)


def photos(
  count: int, size: int = 224, seed: int = 0, data: registry.DataConfig = registry.DEIT_DATA
) -> np.ndarray:
  """`count` images [count, size, size, 3] float32, eval-preprocessed under `data`: the originals
  first, then random crops (at least `size` px, at most the short side) and their mirror images."""
  sources = originals()
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    photo = sources[i % len(sources)]
    if i >= len(sources):
      h, w = photo.shape[:2]
      side = int(rng.integers(min(size, h, w), min(h, w) + 1))
      top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
      photo = photo[top : top + side, left : left + side]
      if rng.random() < 0.5:
        photo = photo[:, ::-1]
    out.append(eval_transform(np.ascontiguousarray(photo), size, data))
  return np.stack(out)
