"""`python -m ats_jax.predict` on scikit-image's photos with a random-weight DeiT-T checkpoint."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import skimage.data
import timm
import torch
from flax import nnx
from PIL import Image

from ats_jax.data import images
from ats_jax.models import flops, get_spec
from ats_jax.models.vit import VisionTransformer
from ats_jax.tools import predict, token_pictures
from tests.helpers import ENV, TINY
from tests.references import random_timm_model

NAME = 'deit_tiny_patch16_224'
ATS = ','.join(map(str, range(3, 12)))
ROOT = pathlib.Path(__file__).resolve().parents[2]
# What a console script's wrapper (pip's `ats-jax-predict`) runs: no docstring, argv[0] its path.
CONSOLE_SCRIPT = 'import sys\nfrom ats_jax.tools.predict import run\nsys.exit(run())\n'
HELP = {  # predict's flags, each with a piece of its help text
  'checkpoint': 'Converted directory',
  'model': 'Variant name',
  'ats_blocks': 'Blocks that sample tokens',
  'num_tokens': 'Cap K per ATS block',
  'top': 'Classes to print',
  'save_tokens': 'Write token pictures',
  'dtype': 'Computation dtype',
  'compile_cache_dir': "JAX's compilation cache",
}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A .safetensors of a random DeiT-T with sharp attention (q, k x4: ATS drops patches, as with
  trained weights), and three photos: RGB PNG, JPEG, greyscale PNG."""
  tmp = tmp_path_factory.mktemp('predict')
  model = random_timm_model(NAME, seed=1)
  with torch.no_grad():
    for block in model.blocks:
      block.attn.qkv.weight[: 2 * model.embed_dim] *= 4
  safetensors.torch.save_file(model.state_dict(), tmp / 'w.safetensors')
  photos = []
  for name, suffix in (('astronaut', 'png'), ('coffee', 'jpg'), ('camera', 'png')):
    Image.fromarray(getattr(skimage.data, name)()).save(tmp / f'{name}.{suffix}')
    photos.append(str(tmp / f'{name}.{suffix}'))
  return model, str(tmp / 'w.safetensors'), photos, tmp


def test_class_names_are_imagenets_in_class_order():
  names = predict.imagenet_classes()
  assert len(names) == 1000 and names[0] == 'tench, Tinca tinca'
  assert names[207] == 'golden retriever'
  assert predict.class_names(10)[3] == 'class 3'


def test_dense_predictions_are_timms_from_the_same_file(files):
  reference, checkpoint, photos, _ = files
  # DeiT-T's keys are ViT-Ti's too: the converter asks for the variant rather than guess
  model = predict.load_model(checkpoint, model=NAME, dtype='float32')
  got = predict.predict(model, photos)
  transform = timm.data.create_transform(224, crop_pct=0.875, interpolation='bicubic')  # DeiT's
  names = predict.imagenet_classes()
  for path, p in zip(photos, got, strict=True):
    pil = Image.open(path).convert('RGB')
    np.testing.assert_allclose(
      images.eval_transform(np.asarray(pil), 224),
      transform(pil).permute(1, 2, 0).numpy(),
      atol=1e-5,
    )
    with torch.no_grad():
      probs = reference(transform(pil)[None]).softmax(-1)[0].numpy()
    best = np.argsort(-probs)[:5]
    assert [n for n, _ in p.top] == [names[c] for c in best]
    np.testing.assert_allclose([q for _, q in p.top], probs[best], atol=1e-4)
    assert p.kept_tokens == [197] * 12
    assert p.gflops == pytest.approx(flops.dense_gflops(get_spec(NAME)), rel=1e-6)


def test_cli_prints_classes_kept_tokens_gflops_and_writes_token_pictures(files):
  _, checkpoint, photos, tmp = files
  out = tmp / 'tokens'
  proc = subprocess.run(
    [sys.executable, '-m', 'ats_jax.predict', f'--checkpoint={checkpoint}', f'--ats_blocks={ATS}']
    + ['--num_tokens=197', f'--save_tokens={out}', f'--compile_cache_dir={tmp / "cache"}']
    + [f'--model={NAME}', '--top=3', '--dtype=float32']
    + photos,
    capture_output=True,
    text=True,
    env=ENV,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  heads = re.findall(r'^(\S+): ([\d.]+) GFLOPs, kept tokens per ATS block (.*)$', proc.stdout, re.M)
  assert [h[0] for h in heads] == photos
  names = set(predict.imagenet_classes())
  for lines in proc.stdout.split('GFLOPs')[1:]:
    top = re.findall(r'^ +([\d.]+)%  (.+)$', lines, re.M)
    assert len(top) == 3 and all(name in names for _, name in top)
    assert [float(q) for q, _ in top] == sorted((float(q) for q, _ in top), reverse=True)
  for image, gflops, kept in heads:
    counts = [int(k.split(':')[1]) for k in kept.split()]
    assert [int(k.split(':')[0]) for k in kept.split()] == list(range(3, 12))
    assert counts == sorted(counts, reverse=True) and counts[-1] < 197, image
    assert float(gflops) < 1.25
    picture = np.asarray(Image.open(out / (image.rsplit('/', 1)[1].rsplit('.', 1)[0] + '.png')))
    band = token_pictures.LABEL_BAND
    assert picture.shape == (band + 224, 10 * 224 + 9 * 4, 3)
    photo, last = picture[band:, :224].astype(int), picture[band:, -224:].astype(int)
    changed = np.abs(photo - last).max(-1) > 0  # [224, 224]: the patches block 11 dropped
    greyed = changed.reshape(14, 16, 14, 16).any((1, 3)).sum()
    assert greyed == 196 - (counts[-1] - 1) > 0  # every patch but the kept ones (cls aside)
    label = np.asarray(token_pictures.label_band(f'block 11: {counts[-1] - 1} kept', 224))
    np.testing.assert_array_equal(picture[:band, -224:], label)
  errors = subprocess.run(
    [sys.executable, '-m', 'ats_jax.predict', f'--checkpoint={checkpoint}', str(tmp / 'no.jpg')],
    capture_output=True,
    text=True,
    env=ENV,
  )
  assert errors.returncode == 1 and errors.stderr.strip().endswith('no.jpg')
  assert errors.stderr.strip().splitlines()[-1].startswith('error: no such image file')


def test_token_strip_labels_each_panel_in_a_band_above_its_unchanged_pixels():
  model = VisionTransformer(
    **TINY | dict(img_size=224, patch_size=32), ats_blocks=(1, 3), rngs=nnx.Rngs(0)
  )
  image = np.random.default_rng(0).uniform(size=(224, 224, 3)).astype(np.float32)
  # per ATS block: cls 0, patch p is token p + 1; a repeated id and -1 padding
  kept_ids = [np.array([0, 1, 2, 6, 10, 10, 49, -1]), np.array([0, 2, 49, -1, -1])]
  kept_patches = [[0, 1, 5, 9, 48], [1, 48]]
  picture = np.asarray(token_pictures.token_strip(image, kept_ids, model)).astype(int)
  band = token_pictures.LABEL_BAND
  assert picture.shape == (band + 224, 3 * 224 + 2 * 4, 3)
  photo = np.round(image * 255)
  grey = np.round((0.25 * image + 0.75 * 0.5) * 255)  # 75% of the way to mid-grey
  panels = [('input', range(49))] + [
    (f'block {b}: {len(kept)} kept', kept) for b, kept in zip((1, 3), kept_patches, strict=True)
  ]
  for i, (label, kept) in enumerate(panels):
    x = i * (224 + 4)
    keep = np.zeros(49, bool)
    keep[list(kept)] = True
    keep = np.kron(keep.reshape(7, 7), np.ones((32, 32), bool))[..., None]
    np.testing.assert_allclose(picture[band:, x : x + 224], np.where(keep, photo, grey), atol=1)
    text = picture[:band, x : x + 224]
    assert (text.max(-1) < 64).sum() > 20 and (text.min(-1) == 255).mean() > 0.8  # black on white
    np.testing.assert_array_equal(text, np.asarray(token_pictures.label_band(label, 224)))
  assert (picture[:, 224 : 224 + 4] == 255).all()  # the gap stays white, band included
  for block, ids, kept in zip((1, 3), kept_ids, kept_patches, strict=True):
    keep = token_pictures.patch_keep_map(ids, model.num_prefix_tokens, 7)
    assert token_pictures.block_label(block, keep) == f'block {block}: {len(kept)} kept'


@pytest.mark.parametrize('entry', ['module', 'console script'])
def test_help_lists_predicts_flags_with_their_help(entry, tmp_path):
  script = tmp_path / 'ats-jax-predict'
  script.write_text(CONSOLE_SCRIPT)
  command = ['-m', 'ats_jax.predict'] if entry == 'module' else [str(script)]
  proc = subprocess.run(
    [sys.executable, *command, '--help'],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=ENV | {'PYTHONPATH': str(ROOT)},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  usage, listed = proc.stdout.split('\nflags:\n')  # listed: the flags --help shows, not --helpfull
  assert usage.startswith('Classify image files with a checkpoint')
  assert sorted(re.findall(r'^  --(\w+):', listed, re.M)) == sorted(HELP)  # absl's: --helpfull
  for name, help_text in HELP.items():
    assert re.search(rf'^  --{name}: {help_text}', listed, re.M), (name, listed)
