"""Which image patches each ATS block keeps, drawn as in the paper's teaser figure.

One row per image: the image the model sees, then per ATS block the same image with the patches it
dropped greyed out, titled with the tokens it kept (cls included, as `stats['kept_tokens']`).

  python -m experiments.visualize_tokens  # the demo's model (workdir/digits), six eval digits
  python -m experiments.visualize_tokens --config=configs/deit_s_ats.py --checkpoint=ckpt/deit_s
  python -m experiments.visualize_tokens --images=a.jpg,b.png --out=/tmp/tokens --json=/tmp/t.json

Images default to the eval split for the digits model and to scikit-learn's two sample photos
otherwise. The kept patches are the model's own record of them (`stats['kept_ids']`, which
`python -m ats_jax.predict --save_tokens` draws too).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags
from flax import nnx
from sklearn.datasets import load_sample_images

from ats_jax.data import input_pipeline
from ats_jax.data.images import denormalize, eval_transform, normalize, read_image
from ats_jax.models import registry
from ats_jax.tools.token_pictures import grey_dropped, patch_keep_map
from experiments import trained

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the headless backend)

PANEL_INCHES = 1.6  # each panel is PANEL_INCHES * DPI pixels square: the PNG size is exact
DPI = 100
FLAGS = flags.FLAGS


def load_images(paths: list[str], size: int, data: registry.DataConfig) -> np.ndarray:
  """Image files, eval-preprocessed as the model's data (PIL, as `python -m ats_jax.predict`):
  [B, S, S, 3]
  normalised; a file PIL cannot read is a ValueError that names it."""
  return np.stack([eval_transform(read_image(path), size, data) for path in paths])


def default_images(
  config, size: int, count: int, data: registry.DataConfig
) -> tuple[np.ndarray, list[str]]:
  """Digits: the first eval image of each class; other data: scikit-learn's sample photos."""
  if config.data.name != 'digits':
    photos = load_sample_images()
    images = [eval_transform(p, size, data) for p in photos.images]
    names = [os.path.splitext(os.path.basename(f))[0] for f in photos.filenames]
    return np.stack(images)[:count], names[:count]
  batch = next(input_pipeline.eval_batches(config, image_size=size))
  first = {}
  for i, label in enumerate(batch['label'][batch['mask']]):
    first.setdefault(int(label), i)
  picks = [first[label] for label in sorted(first)][:count]  # digits 0, 1, 2, ...
  images = normalize(batch['image'][picks], data.mean, data.std)  # the batches are uint8
  return images, [f'digit {batch["label"][i]}' for i in picks]


def draw(
  images, names, kept_ids, counts, blocks, model, path: str, data: registry.DataConfig
) -> None:
  """One row per image: the input, then per ATS block the kept patches (dropped ones greyed)."""
  shown = denormalize(images, data)
  grid, patch = model.img_size // model.spec.patch_size, model.spec.patch_size
  rows, cols = len(images), 1 + len(blocks)
  fig, axes = plt.subplots(
    rows, cols, figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI, squeeze=False
  )
  for r in range(rows):
    panels = [(shown[r], names[r])]
    for j, block in enumerate(blocks):
      keep = patch_keep_map(kept_ids[j][r], model.num_prefix_tokens, grid)
      panels.append((grey_dropped(shown[r], keep, patch), f'block {block}: {counts[r, j]} kept'))
    for ax, (image, title) in zip(axes[r], panels, strict=True):
      ax.imshow(image, interpolation='nearest')  # digits stay crisp when scaled up
      ax.set_title(title, fontsize=8)
      ax.axis('off')
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.05, hspace=0.2)
  fig.savefig(path, dpi=DPI)  # no bbox_inches='tight': the size stays figsize * DPI
  plt.close(fig)


def run(
  config, workdir: str | None, checkpoint: str | None, paths: list[str], count: int, png: str
) -> dict:
  """Traces, checks against the model's stats, draws to `png`; returns what `--json` writes."""
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:  # before the model loads: a typo should not cost a restore
    raise FileNotFoundError(f'no such image file: {", ".join(missing)}')
  model = trained.trained_model(config, workdir, checkpoint)
  data = input_pipeline.eval_data_config(config, model.data_config)
  if paths:
    images = load_images(paths, model.img_size, data)
    names = [os.path.basename(p) for p in paths]
  else:
    images, names = default_images(config, model.img_size, count, data)
  blocks = [i for i, b in enumerate(model.blocks) if b.sampling is not None]
  if not blocks:
    raise ValueError('the model has no ATS block: set --config.ats_blocks')
  forward = nnx.jit(lambda m, x: m(x, return_stats=True))
  _, stats = jax.device_get(forward(model, jnp.asarray(images)))
  kept_ids, counts = stats['kept_ids'], stats['kept_tokens'][:, blocks]  # counts [B, ATS blocks]
  os.makedirs(os.path.dirname(png) or '.', exist_ok=True)
  draw(images, names, kept_ids, counts, blocks, model, png, data)
  return {
    'png': png,
    'ats_blocks': blocks,
    'images': names,
    'kept_tokens': counts.tolist(),
    'kept_token_ids': [
      [ids[r][ids[r] >= 0].tolist() for ids in kept_ids] for r in range(len(names))
    ],
  }


def main(argv: list[str]) -> None:
  del argv
  try:
    result = run(
      FLAGS.config,
      FLAGS.workdir,
      FLAGS.checkpoint or FLAGS.config.checkpoint,
      FLAGS.images,
      FLAGS.num_images,
      os.path.join(FLAGS.out, f'{FLAGS.name}.png'),
    )
  except trained.ERRORS as e:
    sys.exit(f'error: {e}')
  print(f'| image | {" | ".join(f"block {b}" for b in result["ats_blocks"])} |')
  print(f'|---|{"---:|" * len(result["ats_blocks"])}')
  for name, counts in zip(result['images'], result['kept_tokens'], strict=True):
    print(f'| {name} | {" | ".join(map(str, counts))} |')
  trained.report_files(result, FLAGS.json)


def define_flags() -> None:
  trained.define_flags('experiments/results', 'Directory for the PNG.')
  flags.DEFINE_list('images', [], 'Image files; default: eval digits or sample photos.')
  flags.DEFINE_integer('num_images', 6, 'Default images to draw (digits: one of each class).')
  flags.DEFINE_string('name', 'tokens', 'File name of the PNG in --out, without .png.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
