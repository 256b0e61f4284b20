"""The input pipeline: counts, exact eval coverage, deterministic resume, sharding, clear errors."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
import sklearn.datasets
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from timm.data.distributed_sampler import RepeatAugSampler

from ats_jax.data import input_pipeline, preprocessing
from ats_jax.data.input_pipeline import DatasetInfo, InputError
from configs import default

SIZE = 16  # tiny images keep the file fast; the pipeline is the same at 224


def make_config(name: str = 'digits', data_dir: str = '', **fields):
  config = default.get_config()
  config.data.name = name
  config.data.data_dir = str(data_dir)
  config.data.eval_split = 'validation'
  config.batch_size = 4
  config.eval_batch_size = 4
  # RandAugment and random erasing are preprocessing's to test; off here to keep this file fast.
  # test_full_augmentation_resumes_exactly runs the whole DeiT recipe through the pipeline.
  config.aug.randaugment_num_ops = 0
  config.aug.random_erasing = 0.0
  config.aug.repeats = 1  # each example once per epoch; repeated augmentation has its own tests
  for key, value in fields.items():
    if key in config.data:
      config.data[key] = value
    else:
      config[key] = value
  return config


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def eval_reference(images: list[np.ndarray], crop_pct: float = 0.875) -> np.ndarray:
  """preprocessing.eval_pixels of each uint8 image: what eval batches must hold, nothing added."""
  return np.stack(
    [preprocessing.eval_pixels(tf.constant(x), SIZE, crop_pct).numpy() for x in images]
  )


def decode(path) -> np.ndarray:
  """The pixels timm's loader reads: PIL's, which the pipeline's decoding must equal."""
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


def real_examples(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of the unmasked examples, in order."""
  mask = np.concatenate([b['mask'] for b in batches])
  return (
    np.concatenate([b['image'] for b in batches])[mask],
    np.concatenate([b['label'] for b in batches])[mask],
  )


def assert_padding_is_inert(batches: list[dict]) -> None:
  for b in batches:
    assert not b['image'][~b['mask']].any() and not b['label'][~b['mask']].any()


def use_processes(monkeypatch, index: int, count: int) -> None:
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)


# Digits: the embedded default.


def digits_eval_labels() -> np.ndarray:
  """The documented split, rebuilt independently: permutation seed 0, the last 360 for eval."""
  target = sklearn.datasets.load_digits().target
  return target[np.random.default_rng(0).permutation(len(target))][1437:]


def test_digits_info_and_train_batches():
  config = make_config(batch_size=64)
  assert input_pipeline.dataset_info(config.data) == DatasetInfo(tuple('0123456789'), 1437, 360)
  batches = take(input_pipeline.train_batches(config, image_size=SIZE), 2)
  for batch in batches:
    assert batch.keys() == {'image', 'label', 'erase'}
    assert batch['image'].shape == (64, SIZE, SIZE, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
    assert batch['erase'].shape == (64, 4) and batch['erase'].dtype == np.int32
    assert 0 <= batch['label'].min() and batch['label'].max() < 10
    # uint8, normalised on the device: black background, white strokes.
    assert batch['image'].min() == 0 and batch['image'].max() >= 240
  assert not np.array_equal(batches[0]['label'], batches[1]['label'])


def test_digits_eval_counts_every_example_once():
  batches = list(input_pipeline.eval_batches(make_config(eval_batch_size=100), image_size=SIZE))
  assert len(batches) == 4  # 360 = 3 * 100 + 60
  assert [int(b['mask'].sum()) for b in batches] == [100, 100, 100, 60]
  for b in batches:
    assert b['image'].shape == (100, SIZE, SIZE, 3) and b['mask'].dtype == np.bool_
  assert_padding_is_inert(batches)
  _, labels = real_examples(batches)
  np.testing.assert_array_equal(labels, digits_eval_labels())


def test_digits_unknown_split():
  with pytest.raises(InputError, match=r"'digits' has no split 'val'.*'train', 'validation'"):
    input_pipeline.dataset_info(make_config(eval_split='val').data)


# Determinism and exact resume.


def test_train_is_deterministic_and_resumes_exactly_across_epochs():
  config = make_config(batch_size=256)  # 1437 // 256 = 5 steps per epoch
  reference = take(input_pipeline.train_batches(config, image_size=SIZE), 7)
  assert_same_batches(take(input_pipeline.train_batches(config, image_size=SIZE), 2), reference[:2])
  resumed = input_pipeline.train_batches(config, image_size=SIZE, start_step=4)
  assert_same_batches(take(resumed, 2), reference[4:6])  # the last of epoch 0, the first of 1
  resumed = input_pipeline.train_batches(config, image_size=SIZE, start_step=6)
  assert_same_batches(take(resumed, 1), reference[6:7])
  # Epoch 1 is a new shuffle, and another seed a new run.
  assert not np.array_equal(reference[0]['label'], reference[5]['label'])
  config.seed = 1
  other = take(input_pipeline.train_batches(config, image_size=SIZE), 1)
  assert not np.array_equal(other[0]['label'], reference[0]['label'])


# Folder: the ILSVRC2012 layout.

CLASSES = ('zebra', 'apple', 'mango')  # written unsorted: indices must follow sorted names


def write_image(path, size: tuple[int, int], colour: tuple[int, int, int], mode: str = 'RGB'):
  pixels = np.zeros((size[1], size[0], 3), np.uint8) + np.array(colour, np.uint8)
  pixels[::3, ::2] = 255 - pixels[::3, ::2]  # texture, so crops and resizes matter
  image = Image.fromarray(pixels)
  image.convert(mode).save(path, format='PNG' if str(path).endswith('.png') else 'JPEG')


def write_folder(root, split: str, per_class: int = 5, classes=CLASSES) -> list[str]:
  """Images of varied sizes, colours, extensions and modes; returns them in index order."""
  for c, name in enumerate(classes):
    os.makedirs(root / split / name)
    for i in range(per_class):
      ext = ('.JPEG', '.jpg', '.png', '.JPG', '.PNG')[i % 5]
      mode = 'L' if i == 2 else 'RGB'  # a grey PNG must come out RGB
      colour = (40 * c + 10 * i, 200 - 30 * i, 90 + 20 * c)
      write_image(root / split / name / f'img{i}{ext}', (20 + 7 * i, 30 - 3 * c), colour, mode)
    (root / split / name / 'notes.txt').write_text('not an image')
  os.makedirs(root / split / '.ipynb_checkpoints')  # hidden: not a class
  return [
    str(root / split / name / f)
    for name in sorted(classes)
    for f in sorted(os.listdir(root / split / name))
    if not f.endswith('.txt')
  ]


@pytest.fixture
def folder(tmp_path):
  write_folder(tmp_path, 'train')
  return tmp_path, write_folder(tmp_path, 'val')


def test_folder_info_classes_and_eval_equal_preprocessing(folder):
  root, val_files = folder
  config = make_config('folder', root, eval_split='val', eval_batch_size=4)
  assert input_pipeline.dataset_info(config.data) == DatasetInfo(
    ('apple', 'mango', 'zebra'), 15, 15
  )
  batches = list(input_pipeline.eval_batches(config, image_size=SIZE))
  assert len(batches) == 4 and [int(b['mask'].sum()) for b in batches] == [4, 4, 4, 3]
  assert_padding_is_inert(batches)
  images, labels = real_examples(batches)
  np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 5))  # apple, mango, zebra
  assert all('/zebra/' in f for f in val_files[10:])
  np.testing.assert_allclose(images, eval_reference([decode(f) for f in val_files]), atol=1e-6)


def test_epochs_are_one_pipeline_without_restarts(indexed_folder, monkeypatch):
  """Training on a folder crosses epoch boundaries in one tf.data pipeline: no rebuild, no stall;
  each epoch still a new shuffle of every example once."""
  pipelines = []
  checked = input_pipeline._checked
  monkeypatch.setattr(
    input_pipeline, '_checked', lambda ds, *a, **k: pipelines.append(ds) or checked(ds, *a, **k)
  )
  config = make_config('folder', indexed_folder, eval_split='val', batch_size=10)
  steps = INDEXED // 10
  batches = take(input_pipeline.train_batches(config, image_size=SIZE), 3 * steps)  # 3 epochs
  assert len(pipelines) == 1
  epochs = [
    np.concatenate([b['label'] for b in batches[e * steps : (e + 1) * steps]]) for e in range(3)
  ]
  for labels in epochs:  # one image per class: each example once per epoch
    assert sorted(labels) == list(range(INDEXED))
  assert not np.array_equal(epochs[0], epochs[1])


def test_folder_train_batches(folder):
  root, _ = folder
  config = make_config('folder', root, eval_split='val', batch_size=4)
  batches = take(input_pipeline.train_batches(config, image_size=SIZE), 4)  # 3 per epoch, then 1
  assert all(b['image'].shape == (4, SIZE, SIZE, 3) for b in batches)
  epoch = np.concatenate([b['label'] for b in batches[:3]])
  assert set(epoch) <= {0, 1, 2} and len(set(epoch)) == 3  # 12 of the 15, shuffled over classes
  resumed = input_pipeline.train_batches(config, image_size=SIZE, start_step=3)
  assert_same_batches(take(resumed, 1), batches[3:])


def test_two_processes_share_eval_disjointly_with_equal_batch_counts(folder, monkeypatch):
  root, val_files = folder
  config = make_config('folder', root, eval_split='val', eval_batch_size=4)  # 2 per process
  per_process = []
  for index in (0, 1):
    use_processes(monkeypatch, index, 2)
    per_process.append(list(input_pipeline.eval_batches(config, image_size=SIZE)))
  assert [len(b) for b in per_process] == [4, 4]  # 7 and 8 examples: the first pads one more
  assert [sum(int(b['mask'].sum()) for b in batches) for batches in per_process] == [7, 8]
  images = np.concatenate([real_examples(b)[0] for b in per_process])
  # Contiguous shares in order: together they are the split, each file exactly once.
  np.testing.assert_allclose(images, eval_reference([decode(f) for f in val_files]), atol=1e-6)
  use_processes(monkeypatch, 1, 2)
  config.batch_size = 4
  assert next(input_pipeline.train_batches(config, image_size=SIZE))['image'].shape[0] == 2


@pytest.mark.parametrize('field', ['batch_size', 'eval_batch_size'])
def test_batch_not_divisible_by_process_count(monkeypatch, field):
  use_processes(monkeypatch, 0, 3)
  config = make_config(**{field: 4})
  make = input_pipeline.train_batches if field == 'batch_size' else input_pipeline.eval_batches
  with pytest.raises(
    InputError, match=rf'^{field} 4 must be a positive multiple of the process count 3$'
  ):
    make(config, image_size=SIZE)


def test_batch_larger_than_the_train_split(folder):
  config = make_config('folder', folder[0], batch_size=32)
  with pytest.raises(InputError, match=r'folder .*train has 15 examples.*batch of 32'):
    input_pipeline.train_batches(config, image_size=SIZE)


def test_folder_errors(tmp_path):
  def info_error(data_dir, eval_split='val') -> str:
    config = make_config('folder', data_dir, eval_split=eval_split)
    with pytest.raises(InputError) as error:
      input_pipeline.dataset_info(config.data)
    message = str(error.value)
    assert '\n' not in message
    return message

  assert 'data_dir is empty' in info_error('')
  assert info_error(tmp_path / 'nowhere') == f'data_dir {tmp_path / "nowhere"} does not exist'
  write_folder(tmp_path, 'train', per_class=1)
  assert f'split folder {tmp_path / "val"} does not exist' in info_error(tmp_path)
  os.makedirs(tmp_path / 'val')
  assert f'no class folders in {tmp_path / "val"}' in info_error(tmp_path)
  os.makedirs(tmp_path / 'val' / 'apple')
  (tmp_path / 'val' / 'apple' / 'readme.txt').write_text('no images here')
  assert f'class folder {tmp_path / "val" / "apple"} has no' in info_error(tmp_path)
  shutil.rmtree(tmp_path / 'val' / 'apple')
  os.makedirs(tmp_path / 'val' / 'kiwi')
  write_image(tmp_path / 'val' / 'kiwi' / 'a.JPEG', (9, 9), (1, 2, 3))
  assert info_error(tmp_path) == (
    f'the classes of folder {tmp_path / "val"} (kiwi) are not all classes of the model: kiwi '
    "match none of its 3 class names (such as 'apple')"
  )


@pytest.mark.parametrize(
  'kind, reason',
  [
    ('garbage', 'unknown image format: PIL cannot identify'),
    ('truncated', 'image file is truncated'),
  ],
)
@pytest.mark.parametrize('split', ['train', 'val'])
def test_corrupt_image_names_the_file(folder, split, kind, reason):
  root, _ = folder
  bad = root / split / 'mango' / 'img2b.JPEG'  # sorts into the middle: found in a later batch
  if kind == 'garbage':
    bad.write_bytes(b'this is not a JPEG')
  else:  # a real JPEG cut short: its header (and size) read fine, its pixels do not
    photo = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(photo).save(bad, format='JPEG', quality=95)
    bad.write_bytes(bad.read_bytes()[:2000])
  config = make_config('folder', root, eval_split='val', batch_size=4, eval_batch_size=2)
  if split == 'train':
    batches = input_pipeline.train_batches(config, image_size=SIZE)
  else:
    batches = input_pipeline.eval_batches(config, image_size=SIZE)
  with pytest.raises(InputError, match=rf'^cannot read image file {bad}: {reason}'):
    for _ in range(8):  # two epochs: the bad file is in one of them, not in a dropped remainder
      next(batches)


# TFDS: mocked cifar10, and a tiny dataset really prepared on disk.


def write_tfds_metadata(data_dir, name: str, splits: dict[str, int]) -> None:
  """dataset_info.json for mock_data, with our split sizes (the mock ignores the real ones)."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  template = tfds.core.ShardedFileTemplate(
    data_dir=builder.data_path, dataset_name=name, filetype_suffix='tfrecord'
  )
  infos = [tfds.core.SplitInfo(s, [n], 0, template.replace(split=s)) for s, n in splits.items()]
  builder.info.set_splits(tfds.core.SplitDict(infos))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)


def test_tfds_mock_cifar10_end_to_end(tmp_path):
  # The mock yields the same num_examples for every split, so both splits have that size.
  write_tfds_metadata(tmp_path, 'cifar10', {'train': 10, 'test': 10})
  config = make_config('cifar10', tmp_path, eval_split='test', batch_size=4, eval_batch_size=4)
  with tfds.testing.mock_data(num_examples=10, data_dir=str(tmp_path)):
    # the metadata written above names the mock's labels by number, as ClassLabel(num_classes=...)
    assert input_pipeline.dataset_info(config.data) == DatasetInfo(tuple('0123456789'), 10, 10)
    train = take(input_pipeline.train_batches(config, image_size=SIZE), 3)
    batches = list(input_pipeline.eval_batches(config, image_size=SIZE))
    examples = list(tfds.builder('cifar10').as_dataset(split='test').as_numpy_iterator())
  assert all(b['image'].shape == (4, SIZE, SIZE, 3) and b['label'].max() < 10 for b in train)
  assert [int(b['mask'].sum()) for b in batches] == [4, 4, 2]
  assert_padding_is_inert(batches)
  images, labels = real_examples(batches)
  np.testing.assert_array_equal(labels, [e['label'] for e in examples])
  np.testing.assert_allclose(images, eval_reference([e['image'] for e in examples]), atol=1e-6)


class AtsTestImages(tfds.core.GeneratorBasedBuilder):
  """30 train and 11 test images of varied sizes, 3 classes: prepared offline in a temp dir."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.ClassLabel(num_classes=3),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(30, 0), 'test': self._generate_examples(11, 1)}

  def _generate_examples(self, n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
      image = rng.integers(0, 256, (8 + i % 5, 12, 3), dtype=np.uint8)
      yield i, {'image': image, 'label': i % 3}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  stats = tfds.download.ComputeStatsMode.SKIP
  tfds.builder('ats_test_images', data_dir=str(data_dir)).download_and_prepare(
    download_config=tfds.download.DownloadConfig(compute_stats=stats)
  )
  return data_dir


def test_tfds_prepared_resume_and_two_processes(tfds_dir, monkeypatch):
  config = make_config('ats_test_images', tfds_dir, eval_split='test', batch_size=4)
  assert input_pipeline.dataset_info(config.data) == DatasetInfo(('0', '1', '2'), 30, 11)
  reference = take(input_pipeline.train_batches(config, image_size=SIZE), 9)  # 7 per epoch
  assert_same_batches(take(input_pipeline.train_batches(config, image_size=SIZE), 2), reference[:2])
  resumed = input_pipeline.train_batches(config, image_size=SIZE, start_step=6)
  assert_same_batches(take(resumed, 3), reference[6:9])
  examples = tfds.builder('ats_test_images', data_dir=str(tfds_dir)).as_dataset(split='test')
  expected = eval_reference([e['image'] for e in examples.as_numpy_iterator()])
  per_process = []
  for index in (0, 1):
    use_processes(monkeypatch, index, 2)  # 6 and 5 examples, 2 per batch: 3 batches each
    per_process.append(list(input_pipeline.eval_batches(config, image_size=SIZE)))
  assert [[int(b['mask'].sum()) for b in batches] for batches in per_process] == [
    [2, 2, 2],
    [2, 2, 1],
  ]
  images = np.concatenate([real_examples(batches)[0] for batches in per_process])
  np.testing.assert_allclose(images, expected, atol=1e-6)


def test_tfds_errors(tmp_path, tfds_dir):
  def error(name, data_dir, eval_split='validation') -> str:
    with pytest.raises(InputError) as info:
      input_pipeline.dataset_info(make_config(name, data_dir, eval_split=eval_split).data)
    assert '\n' not in str(info.value)
    return str(info.value)

  message = error('no_such_dataset', '')
  assert "unknown dataset 'no_such_dataset'" in message and "'digits', 'folder'" in message
  message = error('cifar10', tmp_path / 'empty')
  assert f"'cifar10' is not prepared in data_dir {tmp_path / 'empty'}" in message
  assert f'tfds build cifar10 --data_dir={tmp_path / "empty"}' in message
  message = error('imagenet2012', tmp_path)
  assert f'manual download into {tmp_path}/downloads/manual' in message
  assert 'ILSVRC2012_img_train.tar' in message
  assert "has no split 'validation'; its splits are ['train', 'test']" in error(
    'ats_test_images', tfds_dir
  )


def test_full_augmentation_resumes_exactly(folder):
  """DeiT's whole recipe (RandAugment, random erasing) is stateless too: resume stays exact."""
  config = make_config('folder', folder[0], eval_split='val', batch_size=4)
  config.aug = default.get_config().aug
  reference = take(input_pipeline.train_batches(config, image_size=SIZE), 4)  # 3 per epoch
  resumed = input_pipeline.train_batches(config, image_size=SIZE, start_step=3)
  assert_same_batches(take(resumed, 1), reference[3:])
  assert not np.array_equal(reference[0]['image'], reference[1]['image'])


# Repeated augmentation: DeiT's RASampler.


@pytest.mark.parametrize('num_examples', [10, 31, 1437])
def test_repeated_share_equals_timm_repeat_aug_sampler(num_examples):
  """In the epoch's order, each process' share is timm's RepeatAugSampler's (DeiT's RASampler),
  kept to N // processes examples (timm: N // 256 * 256 / processes, or with selected_round=0 the
  ceiling of N / processes)."""
  for num_hosts in (1, 2, 3, 4, 8):
    for repeats in (2, 3):
      for host in range(num_hosts):
        sampler = RepeatAugSampler(
          range(num_examples), num_hosts, host, shuffle=False, num_repeats=repeats, selected_round=0
        )
        ours = input_pipeline.repeated_share(np.arange(num_examples), repeats, host, num_hosts)
        assert len(ours) == num_examples // num_hosts
        np.testing.assert_array_equal(ours, list(sampler)[: len(ours)])
        if num_examples < 100:  # the tf.data version, as TFDS sources use it
          ds = tf.data.Dataset.from_tensor_slices((np.arange(num_examples), np.zeros(num_examples)))
          ds = input_pipeline._repeated_share_dataset(ds, num_examples, repeats, host, num_hosts)
          np.testing.assert_array_equal([int(i) for i, _ in ds.as_numpy_iterator()], ours)


INDEXED = 30  # images, each its own class: a label names its image


@pytest.fixture(scope='module')
def indexed_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('indexed')
  for split in ('train', 'val'):
    for i in range(INDEXED):
      os.makedirs(root / split / f'c{i:02d}')
      colour = (8 * i, 255 - 8 * i, 90 + 3 * i)
      write_image(root / split / f'c{i:02d}' / 'a.png', (14 + i % 7, 12 + i % 5), colour)
  return root


def check_repeated_epoch(config, monkeypatch, num_hosts: int) -> np.ndarray:
  """One epoch of 30 images with repeats 3, batch 6 (5 steps), on each of `num_hosts` simulated
  processes: 10 images 3 times each, copies spread as RASampler, each copy augmented anew.
  Returns the labels in the global RASampler order."""
  labels, images = [], []
  for host in range(num_hosts):
    use_processes(monkeypatch, host, num_hosts)
    batches = take(input_pipeline.train_batches(config, image_size=SIZE), 5)
    labels.append(np.concatenate([b['label'] for b in batches]))
    images.append(np.concatenate([b['image'] for b in batches]))
  counts = np.bincount(np.concatenate(labels), minlength=INDEXED)
  assert sorted(counts) == [0] * 20 + [3] * 10
  order = np.empty(INDEXED, np.int32)  # process h holds positions h, h + P, ... of the list
  for host in range(num_hosts):
    order[host::num_hosts] = labels[host]
  assert np.all(order.reshape(10, 3) == order[::3, None])  # each image 3 times in a row
  for image in np.flatnonzero(counts):
    holders = [h for h in range(num_hosts) if image in labels[h]]
    assert len(holders) == min(num_hosts, 3)  # the copies on as many processes as can hold them
    copies = np.concatenate([x[y == image] for x, y in zip(images, labels, strict=True)])
    assert all(not np.array_equal(copies[i], copies[j]) for i, j in [(0, 1), (0, 2), (1, 2)])
  return order


@pytest.mark.parametrize('num_hosts', [1, 2, 3])
def test_repeated_augmentation_folder(indexed_folder, monkeypatch, num_hosts):
  config = make_config('folder', indexed_folder, eval_split='val', batch_size=6)
  config.aug.repeats = 3
  order = check_repeated_epoch(config, monkeypatch, num_hosts)
  # Every process shuffles alike: the global order does not depend on the process count.
  use_processes(monkeypatch, 0, 1)
  epochs = take(input_pipeline.train_batches(config, image_size=SIZE), 10)
  first = np.concatenate([b['label'] for b in epochs[:5]])
  np.testing.assert_array_equal(first, order)
  second = np.concatenate([b['label'] for b in epochs[5:]])
  assert set(second) != set(first)  # another epoch, another third of the images
  # Resumes exactly, mid-epoch and across the epoch boundary, on the last process
  use_processes(monkeypatch, num_hosts - 1, num_hosts)
  reference = take(input_pipeline.train_batches(config, image_size=SIZE), 7)
  resumed = input_pipeline.train_batches(config, image_size=SIZE, start_step=3)
  assert_same_batches(take(resumed, 4), reference[3:7])


def test_repeated_augmentation_is_validated(indexed_folder):
  config = make_config('folder', indexed_folder, eval_split='val', batch_size=6)
  config.aug.repeats = 0
  with pytest.raises(InputError, match=r'^aug.repeats must be a whole number >= 1, got 0$'):
    input_pipeline.train_batches(config, image_size=SIZE)


class AtsTestIndexed(tfds.core.GeneratorBasedBuilder):
  """30 train images, each its own class; 5 test images."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.ClassLabel(num_classes=INDEXED),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(INDEXED), 'test': self._generate_examples(5)}

  def _generate_examples(self, n: int):
    rng = np.random.default_rng(n)
    for i in range(n):
      yield i, {'image': rng.integers(0, 256, (9 + i % 4, 11, 3), dtype=np.uint8), 'label': i}


def test_repeated_augmentation_tfds(tmp_path, monkeypatch):
  stats = tfds.download.ComputeStatsMode.SKIP
  tfds.builder('ats_test_indexed', data_dir=str(tmp_path)).download_and_prepare(
    download_config=tfds.download.DownloadConfig(compute_stats=stats)
  )
  config = make_config('ats_test_indexed', tmp_path, eval_split='test', batch_size=6)
  config.aug.repeats = 3
  order = check_repeated_epoch(config, monkeypatch, 2)
  np.testing.assert_array_equal(check_repeated_epoch(config, monkeypatch, 3), order)
  reference = take(input_pipeline.train_batches(config, image_size=SIZE), 7)  # process 2 of 3
  resumed = input_pipeline.train_batches(config, image_size=SIZE, start_step=4)
  assert_same_batches(take(resumed, 3), reference[4:7])
