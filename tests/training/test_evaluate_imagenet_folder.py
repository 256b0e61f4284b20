"""Evaluating a released 1,000-class checkpoint on ImageNet's `val/` alone, or a few of its classes:
scored in the checkpoint's label space, as timm's validation with its class map scores it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from ats_jax.data.labels import Labels, hf_names
from ats_jax.errors import InputError
from ats_jax.training import train
from configs import deit_s_ats
from experiments import photos
from tests.helpers import ENV
from tests.references import random_timm_model, save_checkpoint

NAME = 'deit_tiny_patch16_224'
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# timm's own copy of the 1,000 sorted wnids: the reference label space.
TIMM_WNIDS = os.path.join(os.path.dirname(timm.data.__file__), '_info', 'imagenet_synsets.txt')
# Where each photo goes, by the rank of its class among timm's predictions for it: three top-1
# hits, two top-5 hits only, one miss; so top-1 is 3/6 and top-5 5/6 by construction.
RANKS = (0, 0, 0, 2, 4, 100)


def timm_eval_transform():
  """DeiT's eval transform as timm builds it, at DeiT's crop_pct (timm's config says 0.9)."""
  return timm.data.create_transform(input_size=224, crop_pct=0.875, interpolation='bicubic')


@pytest.fixture(scope='module')
def imagenet_val(tmp_path_factory):
  """A released-style DeiT-T checkpoint and a `val/` of six real photos in wnid folders."""
  root = tmp_path_factory.mktemp('imagenet')
  reference = random_timm_model(NAME, seed=5)
  checkpoint = save_checkpoint(reference, root / 'deit_t', 'deit_pth')
  wnids = open(TIMM_WNIDS).read().split()
  transform = timm_eval_transform()
  placed = 0
  for i, pixels in enumerate(photos.originals()):
    image = Image.fromarray(pixels)
    with torch.no_grad():
      logits = reference(transform(image)[None])[0].numpy()
    order = np.argsort(-logits)
    if -np.diff(logits[order[:6]]).min() < 1e-3:  # a near-tie float32 rounding could flip
      continue
    folder = root / 'val' / wnids[order[RANKS[placed]]]
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f'photo{i}.JPEG', quality=95)
    placed += 1
    if placed == len(RANKS):
      return root, checkpoint, reference
  raise AssertionError(f'only {placed} photos without near-ties')


def timm_validation(root, reference) -> tuple[float, float]:
  """top-1 and top-5 as timm's validate.py computes them with `--class-map`."""
  dataset = timm.data.create_dataset('', root=str(root / 'val'), class_map=TIMM_WNIDS)
  dataset.transform = timm_eval_transform()
  top1 = top5 = 0
  with torch.no_grad():
    for image, target in dataset:
      top = reference(image[None])[0].topk(5).indices.tolist()
      top1, top5 = top1 + (top[0] == target), top5 + (target in top)
  return top1 / len(dataset), top5 / len(dataset)


def evaluate_config(root, checkpoint, eval_split='val'):
  config = deit_s_ats.get_config()
  config.model, config.checkpoint, config.mode = NAME, checkpoint, 'evaluate'
  config.ats_blocks = ()  # the label space is the point here; ATS has its own parity tests
  config.data.name, config.data.data_dir, config.data.eval_split = 'folder', str(root), eval_split
  config.eval_batch_size = len(RANKS)  # one batch
  config.compile_cache_dir = ''
  return config


def test_a_val_only_folder_of_a_few_wnids_scores_as_timm_validation(imagenet_val, tmp_path):
  root, checkpoint, reference = imagenet_val
  assert not (root / 'train').exists()
  results = train.evaluate_checkpoint(evaluate_config(root, checkpoint), str(tmp_path))
  expected = timm_validation(root, reference)
  assert expected == (3 / 6, 5 / 6)
  assert (results['dense']['top1'], results['dense']['top5']) == pytest.approx(expected)
  assert results['dense']['examples'] == len(RANKS)

  def strict(constant):
    raise ValueError(f'{constant} is not JSON')

  written = json.loads((tmp_path / 'eval_results.json').read_text(), parse_constant=strict)
  speed = written['dense']['images_per_sec']  # one batch: timed, its compilation excluded
  assert speed is None or speed > 0


def test_a_folder_of_classes_the_checkpoint_does_not_know_fails_in_one_line(imagenet_val, tmp_path):
  root, checkpoint, _ = imagenet_val
  for name in ('cat', 'dog'):
    os.makedirs(tmp_path / 'pets' / name)
    Image.new('RGB', (32, 32), (9, 99, 199)).save(tmp_path / 'pets' / name / 'a.jpg')
  proc = subprocess.run(
    [
      sys.executable,
      'main.py',
      '--config=configs/deit_s_ats.py',
      '--config.mode=evaluate',
      f'--config.model={NAME}',
      f'--config.checkpoint={checkpoint}',
      '--config.data.name=folder',
      f'--config.data.data_dir={tmp_path}',
      '--config.data.eval_split=pets',
      '--config.compile_cache_dir=',
    ],
    capture_output=True,
    text=True,
    env={k: v for k, v in ENV.items() if k != 'TF_CPP_MIN_LOG_LEVEL'},  # as a user has it
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [
    f'error: the classes of folder {tmp_path / "pets"} (cat, dog) are not all classes of the '
    "model: cat, dog match none of its 1000 class names (such as 'n01440764')"
  ]


def test_labels_map_by_name_onto_the_checkpoints_outputs():
  imagenet = Labels(1000)
  wnids = open(TIMM_WNIDS).read().split()
  np.testing.assert_array_equal(
    imagenet.index_of([wnids[999], wnids[0], wnids[417]], 'val'), [999, 0, 417]
  )
  named = Labels(3, ('cat', 'dog', 'emu'))
  np.testing.assert_array_equal(named.index_of(['emu', 'cat'], 'pets'), [2, 0])
  unnamed = Labels(2)  # a checkpoint of unknown origin: a folder of as many classes, in order
  np.testing.assert_array_equal(unnamed.index_of(['a', 'b'], 'x'), [0, 1])
  with pytest.raises(InputError, match=r'^the classes of x \(a, b, c\) are 3, but the model has 2'):
    unnamed.index_of(['a', 'b', 'c'], 'x')
  with pytest.raises(InputError, match=r'kiwi match none of its 3 class names'):
    named.index_of(['cat', 'kiwi'], 'pets')
  # Hugging Face names its outputs unless it kept transformers' defaults.
  assert hf_names({'1': 'dog', '0': 'cat'}, 2) == ('cat', 'dog')
  assert hf_names({'0': 'LABEL_0', '1': 'LABEL_1'}, 2) is None
  hf_imagenet = Labels(1000, tuple(f'class {i}' for i in range(1000)))  # HF's id2label names
  np.testing.assert_array_equal(hf_imagenet.index_of([wnids[5]], 'val'), [5])  # wnids still map
