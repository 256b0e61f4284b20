"""Image files decode as PIL decodes them (timm's loader), so eval tensors are timm's DeiT eval's.

The JPEGs are scikit-learn's sample photos written by PIL at several qualities and chroma
subsamplings, odd sizes (partial MCUs), progressive, grey and CMYK; beside them a PNG named .JPEG
and an RGBA PNG. Each file is its own class, so a label names the file.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.data import create_transform

from ats_jax.data import device_images, images, input_pipeline, preprocessing
from ats_jax.models import registry
from configs import default

SIZE = 16  # the train and TFDS checks: the decode is what they test, not the resize


def cmyk(rgb: np.ndarray) -> Image.Image:
  """RGB as CMYK with the grey component in K (K = 0, as PIL's own conversion, tests little)."""
  cmy = 255 - rgb.astype(np.int32)
  k = cmy.min(-1, keepdims=True)
  return Image.fromarray(np.concatenate([cmy - k, k], -1).astype(np.uint8), 'CMYK')


@functools.cache
def encoded_files() -> dict[str, bytes]:
  """File name -> bytes, in sorted order (the class index order)."""
  china, flower = load_sample_images().images  # [427, 640, 3] uint8 each
  cases = {
    'cmyk.JPEG': (cmyk(china[40:, :455]), dict(quality=90)),
    'grey.JPEG': (Image.fromarray(flower).convert('L'), dict(quality=85)),
    'png_named.JPEG': (Image.fromarray(flower[100:, :300]), dict(format='PNG')),
    'q50_420.JPEG': (Image.fromarray(china[:301, :257]), dict(quality=50, subsampling=2)),
    'q75_444.jpg': (Image.fromarray(flower[13:400, 5:390]), dict(quality=75, subsampling=0)),
    'q85_progressive.JPEG': (Image.fromarray(china[::-1, 17:]), dict(quality=85, progressive=True)),
    'q90_422.JPEG': (Image.fromarray(flower[:333, 21:462]), dict(quality=90, subsampling=1)),
    'q95_420.jpeg': (Image.fromarray(china[50:, 100:]), dict(quality=95, subsampling=2)),
    'rgba.png': (Image.fromarray(china[:260, :280]).convert('RGBA'), dict()),
  }
  files = {}
  for name, (image, options) in sorted(cases.items()):
    buffer = io.BytesIO()
    options.setdefault('format', 'PNG' if name.endswith('.png') else 'JPEG')
    image.save(buffer, **options)
    files[name] = buffer.getvalue()
  return files


def pil_rgb(data: bytes) -> Image.Image:
  """What timm's ImageDataset loads: Image.open(f).convert('RGB')."""
  return Image.open(io.BytesIO(data)).convert('RGB')


@pytest.fixture(scope='module')
def photo_dir(tmp_path_factory):
  """<root>/{train,val}/<file name>/<file>: each file its own class."""
  root = tmp_path_factory.mktemp('photos')
  for split in ('train', 'val'):
    for name, data in encoded_files().items():
      (root / split / name.replace('.', '_')).mkdir(parents=True)
      (root / split / name.replace('.', '_') / name).write_bytes(data)
  return root


def make_config(name: str, data_dir, **aug):
  config = default.get_config()
  config.data.name = name
  config.data.data_dir = str(data_dir)
  config.data.eval_split = 'val' if name == 'folder' else 'test'
  config.batch_size = config.eval_batch_size = len(encoded_files())
  config.aug.update(random_resized_crop=False, hflip=0.0, randaugment_num_ops=0)
  config.aug.update(random_erasing=0.0, repeats=1, **aug)  # an epoch: each file once
  return config


def test_decode_image_equals_pil_bit_for_bit():
  for name, data in encoded_files().items():
    expected = np.asarray(pil_rgb(data))
    got = preprocessing.decode_image(tf.constant(data)).numpy()
    assert got.dtype == np.uint8 and got.shape == expected.shape, name
    np.testing.assert_array_equal(got, expected, err_msg=name)
    # What TF gives by itself: the fast IDCT (colour and grey JPEGs), CMYK rounded down
    tf_default = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    differs = np.mean(np.any(tf_default != expected, axis=-1))
    if name.endswith('png') or name == 'png_named.JPEG':
      assert differs == 0, name
    else:  # measured: 49-95% of the pixels, by up to 4-14 levels
      assert differs > 0.4, (name, differs)


def test_unreadable_files_get_a_message_naming_them(tmp_path):
  garbage = tmp_path / 'notes.png'
  garbage.write_bytes(b'not an image')
  with pytest.raises(ValueError, match=f'^unknown image format: PIL cannot identify {garbage}$'):
    images.read_image(garbage)
  data = encoded_files()['q90_422.JPEG']
  truncated = tmp_path / 'cut.jpg'
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=f'^{truncated}: image file is truncated'):
    images.read_image(str(truncated))


def test_folder_eval_equals_timm_deit_eval_transform(photo_dir):
  config = make_config('folder', photo_dir)
  (batch,) = input_pipeline.eval_batches(config, image_size=224)
  transform = create_transform(
    224,
    is_training=False,
    interpolation='bicubic',
    crop_pct=0.875,
    mean=registry.IMAGENET_MEAN,
    std=registry.IMAGENET_STD,
  )
  assert batch['mask'].all()
  np.testing.assert_array_equal(batch['label'], np.arange(len(encoded_files())))
  # uint8 batches, normalised as the eval step does (with the eval data config's mean and std)
  images = np.asarray(device_images.normalize(batch['image']))
  for got, data in zip(images, encoded_files().values(), strict=True):
    expected = transform(pil_rgb(data)).permute(1, 2, 0).numpy()  # [224, 224, 3]
    # the same pixels (PIL decodes and resizes both), normalised in float32 by each
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_folder_train_images_are_pil_decoded(photo_dir):
  """Augmentation off, a train image is PIL's bicubic resize of PIL's pixels, exactly."""
  config = make_config('folder', photo_dir)
  batch = next(input_pipeline.train_batches(config, image_size=SIZE))
  files = list(encoded_files().values())
  assert sorted(batch['label']) == list(range(len(files)))  # one epoch: each file once
  for got, label in zip(batch['image'], batch['label'], strict=True):
    expected = pil_rgb(files[label]).resize((SIZE, SIZE), Image.BICUBIC)
    np.testing.assert_array_equal(got, np.asarray(expected))


class AtsTestPhotos(tfds.core.GeneratorBasedBuilder):
  """encoded_files() stored as they are, as TFDS stores ImageNet's JPEGs."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.ClassLabel(num_classes=len(encoded_files())),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(), 'test': self._generate_examples()}

  def _generate_examples(self):
    for i, data in enumerate(encoded_files().values()):
      yield i, {'image': data, 'label': i}


def test_tfds_records_decode_as_pil(tmp_path):
  stats = tfds.download.ComputeStatsMode.SKIP
  tfds.builder('ats_test_photos', data_dir=str(tmp_path)).download_and_prepare(
    download_config=tfds.download.DownloadConfig(compute_stats=stats)
  )
  config = make_config('ats_test_photos', tmp_path)
  files = list(encoded_files().values())
  pixels = [tf.constant(np.asarray(pil_rgb(data))) for data in files]
  (batch,) = input_pipeline.eval_batches(config, image_size=SIZE)
  for got, label in zip(batch['image'], batch['label'], strict=True):
    crop = input_pipeline.eval_data_config(config).crop_pct
    expected = preprocessing.eval_pixels(pixels[label], SIZE, crop).numpy()
    np.testing.assert_array_equal(got, expected)
  batch = next(input_pipeline.train_batches(config, image_size=SIZE))
  assert sorted(batch['label']) == list(range(len(files)))
  for got, label in zip(batch['image'], batch['label'], strict=True):
    expected, _ = preprocessing.train_pixels(pixels[label], tf.constant([0, 0]), SIZE, config.aug)
    np.testing.assert_array_equal(got, expected.numpy())


def test_folder_evaluates_to_timms_top1_on_the_same_weights(photo_dir):
  """DeiT-Ti with random weights (q and k x4), our folder pipeline and model against timm's PIL
  path and model: the same top-1 on every image whose top-2 margin in timm exceeds 1e-3."""
  import torch
  from flax import nnx

  from ats_jax.convert import pretrained
  from ats_jax.models import create_model, load_params
  from tests.references import random_timm_model

  name = 'deit_tiny_patch16_224'
  reference = random_timm_model(name)
  with torch.no_grad():
    for block in reference.blocks:  # sharper attention, as trained weights
      block.attn.qkv.weight[: 2 * block.attn.qkv.in_features] *= 4
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  model = create_model(name)
  load_params(model, dict(pretrained.convert_state_dict(state, name).params), name)
  config = make_config('folder', photo_dir)
  (batch,) = input_pipeline.eval_batches(config, image_size=224)
  transform = create_transform(224, is_training=False, interpolation='bicubic', crop_pct=0.875)
  inputs = torch.stack([transform(pil_rgb(data)) for data in encoded_files().values()])
  with torch.no_grad():
    expected = reference(inputs).numpy()
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, device_images.normalize(batch['image'])))
  top2 = np.sort(expected, axis=-1)[:, -2:]
  decisive = top2[:, 1] - top2[:, 0] > 1e-3
  assert decisive.sum() >= len(decisive) // 2
  np.testing.assert_array_equal(got.argmax(-1)[decisive], expected.argmax(-1)[decisive])
  assert np.abs(got - expected).max() < 1e-3  # the same inputs as timm's
