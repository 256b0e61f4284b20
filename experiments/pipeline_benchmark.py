"""Input pipeline images/s: our tf.data `train_batches`/`eval_batches` beside timm's DataLoader.

Both read the same folder of JPEGs of ImageNet's usual size (500x375 and 375x500, quality 90,
written from the photos scikit-image and scikit-learn ship: random crops, mirrored, resized, so
every file differs) with DeiT's transforms at 224 px, batch 64:
  train  random-resized crop (bicubic), flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25
  eval   bicubic resize of the short side to 256 (crop_pct 0.875), centre crop 224
timm's side is `timm.data.create_transform` in a torch DataLoader with --workers processes
(persistent, as timm's create_loader makes them) giving normalised float tensors; ours is tf.data's
thread pool running PIL (the same pixels as timm's) and gives uint8 images (normalisation and the
erasing noise run on the device, in the jitted step) and the erasing box. Rows:
  within   one epoch of a --files folder (batches 2 on; the first pays for start-up)
  across   a --small_files folder, --epochs epochs in a row: every epoch boundary is in the timing
Each row runs ours and timm's alternately, --repeats rounds; the table gives the median images/s
of each and their ratio. Both use every core of this machine: tf.data its thread pool, timm its
worker processes.

Pillow 13's ImageOps.posterize refuses 0 bits, which timm's PosterizeIncreasing asks for at
magnitude 10 (a gauss(9, 0.5) draw clipped to 10: ~2% of draws); timm's op is wrapped here to return
black then, as older Pillow did and as ours does (`randaugment.posterize`).

  python -m experiments.pipeline_benchmark                    # ~5 minutes on 2 cores
  python -m experiments.pipeline_benchmark --repeats=1 --files=256 --small_files=128 --epochs=2
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
from absl import app, flags
from PIL import Image

_FILES = flags.DEFINE_integer('files', 1536, 'JPEGs in the big folder (the within-epoch rows).')
_SMALL = flags.DEFINE_integer('small_files', 384, 'JPEGs in the small folder (the across rows).')
_EPOCHS = flags.DEFINE_integer('epochs', 4, 'Epochs timed on the small folder.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Images per batch.')
_WORKERS = flags.DEFINE_integer('workers', 2, "timm's DataLoader worker processes.")
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Alternating rounds of ours and timm per row.')
_OUT = flags.DEFINE_string('out', 'experiments/results/pipeline_cpu', 'Writes OUT.md and OUT.json.')

SIZE = 224
CLASSES = 8
JPEG_SHAPES = ((375, 500), (500, 375), (375, 500), (333, 500))  # (h, w): ImageNet's common sizes


def write_folder(root: str, count: int, seed: int = 0) -> str:
  """`count` distinct JPEGs in ImageFolder layout, root/train/<class>/<i>.jpg; returns root."""
  from experiments import photos

  sources = photos.originals()
  rng = np.random.default_rng(seed)
  for i in range(count):
    photo = sources[i % len(sources)]
    h, w = JPEG_SHAPES[i % len(JPEG_SHAPES)]
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.6, 1.0) * min(ph / h, pw / w)  # a crop of the target's aspect
    ch, cw = max(int(h * scale), 8), max(int(w * scale), 8)
    top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    image = Image.fromarray(np.ascontiguousarray(photo[top : top + ch, left : left + cw]))
    image = image.resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    folder = os.path.join(root, 'train', f'class{i % CLASSES}')
    os.makedirs(folder, exist_ok=True)
    image.save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)
  return root


def _posterize_as_old_pillow() -> None:
  """timm's posterize with 0 bits gives black (Pillow 13 raises 'bits must be between 1 and 8')."""
  from timm.data import auto_augment

  original = auto_augment.posterize

  def posterize(img, bits_to_keep, **kwargs):
    if bits_to_keep <= 0:
      return Image.new(img.mode, img.size)
    return original(img, bits_to_keep, **kwargs)

  auto_augment.NAME_TO_OP['PosterizeIncreasing'] = posterize
  auto_augment.NAME_TO_OP['Posterize'] = posterize


def timm_loader(root: str, train: bool, batch: int, workers: int):
  """timm's DeiT transform in a torch DataLoader over root/train."""
  import torch
  import torchvision
  from timm.data import create_transform

  if train:
    transform = create_transform(
      SIZE,
      is_training=True,
      auto_augment='rand-m9-mstd0.5-inc1',
      interpolation='bicubic',
      re_prob=0.25,
      re_mode='pixel',
      re_count=1,
    )
  else:
    transform = create_transform(SIZE, is_training=False, interpolation='bicubic', crop_pct=0.875)
  dataset = torchvision.datasets.ImageFolder(os.path.join(root, 'train'), transform)
  return torch.utils.data.DataLoader(
    dataset,
    batch_size=batch,
    shuffle=train,
    num_workers=workers,
    drop_last=train,
    persistent_workers=True,
  )


def timm_batches(loader, train: bool) -> Iterator:
  """Endless batches (train: epoch after epoch), or one pass (eval)."""
  while True:
    yield from loader
    if not train:
      return


def our_config(root: str, batch: int):
  from configs import default

  config = default.get_config()
  config.data.name = 'folder'
  config.data.data_dir = root
  config.data.eval_split = 'train'  # the same files
  config.batch_size = config.eval_batch_size = batch
  config.aug.repeats = 1  # timm's plain shuffle (DeiT's RASampler costs the same per image)
  return config


def our_batches(config, train: bool) -> Iterator:
  from ats_jax.data import input_pipeline

  if train:
    return input_pipeline.train_batches(config, image_size=SIZE)
  return input_pipeline.eval_batches(config, image_size=SIZE)


def timed(make: Callable[[], Iterator], num_batches: int, batch: int) -> float:
  """images/s of batches 2..num_batches of a fresh iterator (the first pays for start-up)."""
  batches = make()
  next(batches)
  start = time.perf_counter()
  for _ in range(num_batches - 1):
    next(batches)
  seconds = time.perf_counter() - start
  del batches
  return (num_batches - 1) * batch / seconds


def main(argv: list[str]) -> None:
  del argv
  from ats_jax.training import runtime

  runtime.quiet_library_logs()
  _posterize_as_old_pillow()
  batch, workers = _BATCH.value, _WORKERS.value
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    big = write_folder(os.path.join(tmp, 'big'), _FILES.value)
    small = write_folder(os.path.join(tmp, 'small'), _SMALL.value, seed=1)
    per_epoch = _SMALL.value // batch
    settings = [  # (transform, timing, folder, batches timed)
      ('train', 'within', big, _FILES.value // batch),
      ('train', f'across {_EPOCHS.value} epochs', small, per_epoch * _EPOCHS.value),
      ('eval', 'within', big, -(-_FILES.value // batch)),
    ]
    for transform, timing, root, num_batches in settings:
      train = transform == 'train'
      config = our_config(root, batch)
      loaders = {}  # timm's workers persist across rounds, as across epochs
      ours, theirs = [], []
      for _ in range(_REPEATS.value):
        ours.append(timed(functools.partial(our_batches, config, train), num_batches, batch))
        if timing.startswith('across') or not loaders:
          loaders['timm'] = timm_loader(root, train, batch, workers)
        loader = loaders['timm']
        theirs.append(timed(functools.partial(timm_batches, loader, train), num_batches, batch))
        print(f'{transform} {timing}: ours {ours[-1]:.0f}, timm {theirs[-1]:.0f} images/s')
      rows.append(
        dict(
          transform=transform,
          timing=timing,
          batches=num_batches,
          ours=statistics.median(ours),
          timm=statistics.median(theirs),
          ours_rounds=[round(x, 1) for x in ours],
          timm_rounds=[round(x, 1) for x in theirs],
        )
      )
  table = markdown(rows, batch, workers)
  print(table)
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value + '.md', 'w') as f:
    f.write(table + '\n')
  meta = dict(machine=platform.processor() or platform.machine(), cores=os.cpu_count())
  with open(_OUT.value + '.json', 'w') as f:
    json.dump(dict(meta, batch=batch, workers=workers, rows=rows), f, indent=2)


def markdown(rows: list[dict], batch: int, workers: int) -> str:
  lines = [
    f'Input pipeline, DeiT transforms at {SIZE} px, batch {batch}, {os.cpu_count()} CPU cores '
    f'(timm: DataLoader, {workers} workers); median of alternating rounds.',
    '',
    '| transform | timing | ours (images/s) | timm (images/s) | ours / timm |',
    '|---|---|---:|---:|---:|',
  ]
  for r in rows:
    ratio = r['ours'] / r['timm']
    lines.append(
      f'| {r["transform"]} | {r["timing"]} | {r["ours"]:.0f} | {r["timm"]:.0f} | {ratio:.2f}x |'
    )
  return '\n'.join(lines)


if __name__ == '__main__':
  app.run(main)
