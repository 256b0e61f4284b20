"""The tf.data input pipeline: this process' share of deterministic, resumable batches as numpy.

Sources, chosen by `config.data.name`:
  'digits'  scikit-learn's 1,797 8x8 handwritten digits, shipped inside the package, so a run needs
            no download. Grey 0..16 becomes RGB uint8 (x * 255 / 16). A split fixed once (a
            permutation with seed 0, whatever config.seed) gives 1,437 'train' and 360 'validation'
            images; those are the only split names.
  'folder'  the layout the original ATS reads: <data_dir>/<split>/<class>/*.{jpg,jpeg,png}. A
            split's classes are its sorted sub-folder names; evaluation maps them by name onto the
            model's outputs (`labels`: ImageNet wnids onto a 1,000-class checkpoint's), so `val/`
            alone, or a few of its classes, evaluates without `train/`.
  other     a TFDS dataset already prepared in data_dir, with features 'image' and 'label'.
Image files and TFDS records are decoded, resized and augmented by PIL, as timm does
(`preprocessing`): the same pixels as timm's transforms on the same random draws.

Training is a sequence of epochs. Epoch e on process p is a shuffle of p's examples seeded by
(seed, p, e); an example's augmentation seed is folded from (seed, p, e) and its position in the
epoch. Every epoch drops its last partial batch (the order changes each epoch, so which examples
are dropped does too), making steps_per_epoch = min over processes of examples // local batch. So
batch `step` is a function of (config, step) alone: `start_step` builds epoch step //
steps_per_epoch and skips the earlier examples of it before they are decoded (at most one epoch of
paths, arrays or, for TFDS, encoded records read from disk). For 'digits' and 'folder' the epochs
are one endless tf.data pipeline (each epoch's order computed as it begins), so an epoch boundary
costs nothing; a TFDS reader is rebuilt per epoch (a short stall while its shuffle buffer fills).

Batches leave as uint8 (a quarter of float32's bytes to the device) with, for training, random
erasing's boxes: normalisation and the erasing noise run in the jitted step (`device_images`).

Repeated augmentation (config.aug.repeats = r > 1, DeiT's 3) follows DeiT's RASampler instead:
epoch e is one shuffle of the whole split seeded by (seed, e), the same on every process; each
example is repeated r times in a row and the processes take turns through that list
(`repeated_share`), each keeping N // P of it. An epoch is still about N samples, now N / r
examples seen r times each, every copy with its own augmentation (another position, or another
process); steps_per_epoch does not change. For TFDS every process reads the split's records in that
global order (N / r of them per epoch instead of N / P) and decodes only its own.

The shuffle is an exact permutation for 'digits' and 'folder'; for TFDS it is the file order
shuffled per epoch plus a buffer of config.data.shuffle_buffer examples, as tfds.load does.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import itertools
import os
import re
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from ats_jax.data import preprocessing
from ats_jax.data.labels import Labels
from ats_jax.errors import InputError
from ats_jax.models import registry

BUILTIN_NAMES = ('digits', 'folder')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')  # compared lower-case: ImageNet's are '.JPEG'
PREFETCH = 2  # batches ready ahead of the training step
DIGITS_SPLITS = {'train': slice(0, 1437), 'validation': slice(1437, None)}
DIGITS_CLASSES = tuple('0123456789')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  class_names: tuple[str, ...]  # the train split's: the label space of a model trained on it
  num_train_examples: int
  num_eval_examples: int

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def labels(self) -> Labels:
    return Labels.named(self.class_names)


@dataclasses.dataclass(frozen=True)
class _Split:
  """One split of a source: the same calls for in-memory lists and TFDS."""

  description: str  # names it in messages, e.g. "folder /data/train"
  class_names: tuple[str, ...]  # label i's name: a class folder, a TFDS label name, a digit
  host_sizes: Callable[[int], list[int]]  # process count -> examples per process
  # (process, process count, shuffle seed or None for the fixed order, repeats) -> this process'
  # (record, label) dataset; repeats > 1 shares one shuffle of the whole split as repeated_share
  records: Callable[[int, int, int | None, int], tf.data.Dataset]
  # (process, process count, shuffle seed, repeats, first, stop position) -> the file at fault
  find_bad_file: Callable[[int, int, int | None, int, int, int], str | None] = lambda *_: None
  # record -> what train_pixels and eval_pixels take: the encoded file (decoded there) or pixels
  load: Callable[[tf.Tensor], tf.Tensor] = lambda record: record
  # (process, process count, repeats, epoch -> shuffle seed, first epoch, examples per epoch) ->
  # every epoch from the first as one endless dataset of (position, key, record, label); None: TFDS,
  # whose reader is built per epoch in Python
  stream: Callable[..., tf.data.Dataset] | None = None

  @property
  def num_examples(self) -> int:
    return sum(self.host_sizes(1))


class EvalBatches(Iterator[dict[str, np.ndarray]]):
  """One pass over the eval split, `len()` batches long (each process the same count)."""

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], num_batches: int):
    self._batches, self.num_batches = batches, num_batches

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._batches)

  def __len__(self) -> int:
    return self.num_batches


def dataset_info(data: ml_collections.ConfigDict) -> DatasetInfo:
  """What training on `config.data` needs: the train split's classes and both splits' global
  example counts. Every eval class must be a train class (checked here, before training)."""
  _keep_tf_off_accelerators()
  train = _open_split(data, data.train_split)
  evaluation = _open_split(data, data.eval_split)
  info = DatasetInfo(train.class_names, train.num_examples, evaluation.num_examples)
  info.labels.index_of(evaluation.class_names, evaluation.description)
  return info


def train_batches(
  config: ml_collections.ConfigDict, *, image_size: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """Endless augmented batches, this process' config.batch_size // process_count of each.

  Yields {'image': uint8 [b, S, S, 3], 'label': int32 [b], 'erase': int32 [b, 4]}: DeiT's train
  transform up to normalisation and random erasing's noise, which the jitted step adds
  (`device_images`: ImageNet mean/std, noise in each 'erase' box (top, left, h, w; h = 0: none)).
  The batch at `step` is the same whether reached from step 0 or by starting at start_step=step.
  Problems with the config or the data layout raise InputError here; an unreadable image raises
  it when reached.
  """
  _keep_tf_off_accelerators()
  host, num_hosts, batch = _local_batch(config.batch_size, 'batch_size')
  if start_step < 0:
    raise InputError(f'start_step must be >= 0, got {start_step}')
  repeats = config.aug.repeats
  if not isinstance(repeats, int) or repeats < 1:
    raise InputError(f'aug.repeats must be a whole number >= 1, got {repeats!r}')
  split = _open_split(config.data, config.data.train_split)
  steps_per_epoch = min(split.host_sizes(num_hosts)) // batch
  if steps_per_epoch == 0:
    raise InputError(
      f'{split.description} has {min(split.host_sizes(num_hosts))} examples on a process, '
      f'fewer than its batch of {batch} (batch_size {config.batch_size})'
    )
  logging.info(
    'Training on %s: %d examples, %d steps per epoch of %d per process, from step %d.',
    split.description,
    split.num_examples,
    steps_per_epoch,
    batch,
    start_step,
  )
  return _train_epochs(
    config, split, image_size, host, num_hosts, batch, steps_per_epoch, start_step
  )


def eval_batches(
  config: ml_collections.ConfigDict, *, image_size: int, labels: Labels | None = None
) -> EvalBatches:
  """One pass over the eval split in this process' share of batches of config.eval_batch_size.

  Yields {'image': uint8 [b, S, S, 3], 'label': int32 [b], 'mask': bool [b]}: the eval transform
  up to normalisation, which the jitted step does (`device_images.normalize` with
  eval_data_config's mean and std). Labels are the outputs of the model whose label space is
  `labels` (None: the split's own class indices). Padding (mask False, zero image, label 0) fills
  the last batch, and every process yields the same number of batches, as multi-host jit
  requires, so each example counts exactly once.
  """
  _keep_tf_off_accelerators()
  host, num_hosts, batch = _local_batch(config.eval_batch_size, 'eval_batch_size')
  split = _open_split(config.data, config.data.eval_split)
  sizes = split.host_sizes(num_hosts)
  num_batches = -(-max(sizes) // batch)
  if num_batches == 0:
    raise InputError(f'{split.description} has no examples')

  data = eval_data_config(config)
  labels = labels or Labels.named(split.class_names)
  outputs = tf.constant(labels.index_of(split.class_names, split.description))  # [classes]

  def prepare(record: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
    image = preprocessing.eval_pixels(
      split.load(record), image_size, data.crop_pct, data.interpolation
    )
    return {'image': image, 'label': tf.gather(outputs, label), 'mask': tf.constant(True)}

  padding = {
    'image': tf.zeros((image_size, image_size, 3), tf.uint8),
    'label': tf.constant(0, tf.int32),
    'mask': tf.constant(False),
  }
  ds = split.records(host, num_hosts, None, 1).map(prepare, num_parallel_calls=_workers())
  ds = ds.concatenate(
    tf.data.Dataset.from_tensors(padding).repeat(num_batches * batch - sizes[host])
  )
  ds = _finish(ds.batch(batch, drop_remainder=True), deterministic=True)
  logging.info(
    'Evaluating on %s: %d batches of %d per process.', split.description, num_batches, batch
  )
  batches = _checked(
    ds,
    lambda i: split.find_bad_file(host, num_hosts, None, 1, i * batch, (i + 1) * batch),
    split.description,
  )
  return EvalBatches(batches, num_batches)


def eval_data_config(
  config: ml_collections.ConfigDict, model_data: registry.DataConfig | None = None
) -> registry.DataConfig:
  """Eval preprocessing: each of config.data.{mean, std, crop_pct, interpolation} that is set (not
  None) wins; the rest come from config.data.checkpoint_data (what the evaluated checkpoint
  records, set by `train.evaluate_checkpoint`), else `model_data` (a loaded model's
  `data_config`), else from the variant's registered weights."""
  data = config.data
  variant = registry.DATA.get(config.get('model'), registry.DEIT_DATA)
  base = data.get('checkpoint_data') or (model_data or variant).to_json()
  fields = {f: data.get(f) if data.get(f) is not None else base[f] for f in base}
  return registry.DataConfig.from_json(fields)


def _train_epochs(
  config: ml_collections.ConfigDict,
  split: _Split,
  image_size: int,
  host: int,
  num_hosts: int,
  batch: int,
  steps_per_epoch: int,
  start_step: int,
) -> Iterator[dict[str, np.ndarray]]:
  """Every epoch from the one holding start_step, entered at start_step."""
  epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
  repeats, per_epoch = config.aug.repeats, steps_per_epoch * batch

  def seeds(epoch: int) -> tuple[int, list[int]]:
    """(shuffle seed, augmentation key) of an epoch of this process."""
    # A process' own stream: the shuffle and the augmentation differ per process and per epoch.
    seq = np.random.SeedSequence([config.seed % 2**64, host, epoch])  # it needs seeds >= 0
    shuffle_seed, *aug_key = (int(s) for s in seq.generate_state(3))
    if repeats > 1:  # one shuffle of the whole split, the same on every process
      shuffle_seed = int(np.random.SeedSequence([config.seed % 2**64, epoch]).generate_state(1)[0])
    return shuffle_seed, aug_key

  # One tf.function for every epoch: tf.data would otherwise retrace the augmentation (seconds
  # with RandAugment) each time a TFDS epoch's pipeline is built.
  @tf.function
  def prepare(position: tf.Tensor, key: tf.Tensor, record: tf.Tensor, label: tf.Tensor):
    seed = tf.random.experimental.stateless_fold_in(key, position)  # int64 [2]
    image, erase = preprocessing.train_pixels(split.load(record), seed, image_size, config.aug)
    return {'image': image, 'label': tf.cast(label, tf.int32), 'erase': erase}

  def finish(ds: tf.data.Dataset) -> tf.data.Dataset:
    ds = ds.map(prepare, num_parallel_calls=_workers())
    return _finish(ds.batch(batch, drop_remainder=True), deterministic=True)

  def find(epoch: int, first: int) -> Callable[[int], str | None]:
    """Batch i of a stream entering `epoch` at position `first` -> the unreadable file in it."""

    def bad_file(i: int) -> str | None:
      e, start = divmod(first + i * batch, per_epoch)
      shuffle_seed = seeds(epoch + e)[0]
      return split.find_bad_file(host, num_hosts, shuffle_seed, repeats, start, start + batch)

    return bad_file

  skip = step_in_epoch * batch
  if split.stream is not None:  # one dataset: no restart, no stall, at epoch boundaries
    ds = split.stream(host, num_hosts, repeats, seeds, epoch, per_epoch)
    yield from _checked(finish(ds.skip(skip)), find(epoch, skip), split.description)
    return
  while True:  # TFDS: a reader per epoch, each a new shuffle of the files
    shuffle_seed, aug_key = seeds(epoch)
    ds = split.records(host, num_hosts, shuffle_seed, repeats).take(per_epoch)
    ds = ds.enumerate().skip(skip)  # positions count from the epoch start; skip before decoding
    key = tf.constant(aug_key, tf.int64)
    ds = ds.map(lambda i, ex, key=key: (i, key, *ex))
    yield from _checked(finish(ds), find(epoch, skip), split.description)
    epoch, skip = epoch + 1, 0


def _finish(ds: tf.data.Dataset, deterministic: bool) -> tf.data.Dataset:
  """Prefetches, and fixes the order: parallel maps must not reorder what resume relies on.

  Its own thread pool of one thread per core, each op single-threaded (as Flax's ImageNet example
  and big_vision): the parallelism is across examples, not inside an image's small ops. Autotuning
  is off: its model thread sleeps up to a minute between rounds and deleting the iterator waits for
  it to wake, so a process sat idle after its last line; instead one map call per core and
  PREFETCH batches ahead.
  """
  options = tf.data.Options()
  options.deterministic = deterministic
  options.autotune.enabled = False
  options.threading.private_threadpool_size = _workers()
  options.threading.max_intra_op_parallelism = 1
  return ds.prefetch(PREFETCH).with_options(options)


def _workers() -> int:
  """Parallel map calls: one per core."""
  return os.cpu_count() or 1


def _checked(
  ds: tf.data.Dataset, find_bad_file: Callable[[int], str | None], description: str
) -> Iterator[dict[str, np.ndarray]]:
  """Yields ds as numpy, turning a read or decode failure into an InputError naming the file.

  The order is deterministic, so the failing batch is the next one, i: find_bad_file(i) decodes
  its examples one by one.
  """
  pipeline = _Pipeline(ds)
  try:
    for i in itertools.count():
      try:
        batch_arrays = pipeline.next()
      except StopIteration:
        return
      except tf.errors.OpError as error:
        reason = _short(error)
        path = find_bad_file(i)
        where = f'image file {path}' if path else description
        raise InputError(f'cannot read {where}: {reason}') from None
      yield batch_arrays
  finally:  # the generator closed, collected or exhausted: stop the pipeline's threads now
    pipeline.close()


class _Pipeline:
  """Owns a tf.data iterator, so that it is deleted while the interpreter still runs.

  Deleting an iterator waits for its worker threads; those running `tf.numpy_function` (PIL) need
  the GIL, which they can no longer take once the interpreter is finalising: an iterator left to
  interpreter teardown can hang the process forever. `close_pipelines` (atexit) closes the rest.
  """

  def __init__(self, ds: tf.data.Dataset):
    self._iterator = ds.as_numpy_iterator()
    self._open = _OPEN  # still reachable when module globals are cleared at teardown
    self._open.add(self)

  def next(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      raise StopIteration
    return next(self._iterator)

  def close(self) -> None:
    self._iterator = None  # TF releases the GIL while the iterator's threads stop
    self._open.discard(self)


_OPEN: set[_Pipeline] = set()  # not yet closed


@atexit.register
def close_pipelines() -> None:
  """Deletes every open pipeline's iterator (and frees cycles holding one) before teardown."""
  for pipeline in list(_OPEN):
    pipeline.close()
  gc.collect()


def _short(error: tf.errors.OpError) -> str:
  """TF's message without node names and op tags: the first line a user can act on; for an error
  raised in Python (PIL, inside `tf.numpy_function`), its own message after the traceback."""
  raised = re.findall(r'^\w[\w.]*(?:Error|Exception): (.+)$', error.message, re.MULTILINE)
  if raised:
    return raised[-1].strip()
  message = re.sub(r'\{\{[^}]*\}\}\s*', '', error.message)
  message = re.sub(
    r'Error in user-defined function passed to \S+ transformation with iterator: \S+: ', '', message
  )
  message = re.sub(r'\s*\[\[.*|\s*\[Op:\w+\]', '', message)
  return message.strip().splitlines()[0] if message.strip() else type(error).__name__


def _local_batch(global_batch: int, field: str) -> tuple[int, int, int]:
  """(process index, process count, this process' batch) for a global batch size."""
  num_hosts = jax.process_count()
  if global_batch <= 0 or global_batch % num_hosts:
    raise InputError(
      f'{field} {global_batch} must be a positive multiple of the process count {num_hosts}'
    )
  return jax.process_index(), num_hosts, global_batch // num_hosts


def _keep_tf_off_accelerators() -> None:
  """tf.data runs on the host; TF must not reserve the GPU memory JAX needs (Flax's examples)."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices: too late to hide them
    logging.warning('TensorFlow was initialised before the input pipeline; it may hold GPUs.')


def _open_split(data: ml_collections.ConfigDict, split: str) -> _Split:
  """The one place the source is chosen by name."""
  if data.name == 'digits':
    return _digits_split(split)
  if data.name == 'folder':
    return _folder_split(data.data_dir, split)
  return _tfds_split(data.name, data.data_dir, split, data.shuffle_buffer)


def repeated_share(order: np.ndarray, repeats: int, host: int, num_hosts: int) -> np.ndarray:
  """Process `host`'s share of an epoch with repeated augmentation, as DeiT's RASampler.

  `order` is the epoch's shuffle of all N examples, the same on every process. Each example is
  repeated `repeats` times in a row and the processes take turns: `host` takes positions host,
  host + num_hosts, ..., so the copies of one example land on different processes (when there
  are at least `repeats`). Each process keeps N // num_hosts: the epoch stays N samples long.
  RASampler keeps floor(N // 256 * 256 / num_hosts) (timm's RepeatAugSampler: `selected_round`);
  we do not round to 256, as the last partial batch is dropped anyway and under 256 examples that
  rounding keeps none. Its padding of the list to a multiple of num_hosts is never reached here.
  """
  return np.repeat(order, repeats)[host::num_hosts][: len(order) // num_hosts]


def _repeated_share_dataset(
  ds: tf.data.Dataset, num_examples: int, repeats: int, host: int, num_hosts: int
) -> tf.data.Dataset:
  """repeated_share of a dataset of the epoch's global order (every process reads all of it)."""
  ds = ds.flat_map(lambda *example: tf.data.Dataset.from_tensors(example).repeat(repeats))
  return ds.shard(num_hosts, host).take(num_examples // num_hosts)


def _host_range(size: int, host: int, num_hosts: int) -> tuple[int, int]:
  """Contiguous shares whose sizes differ by at most one, as tfds.even_splits."""
  return size * host // num_hosts, size * (host + 1) // num_hosts


def _list_split(
  description: str,
  class_names: tuple[str, ...],
  records: np.ndarray,
  labels: np.ndarray,
  paths: bool = False,
  load: Callable[[tf.Tensor], tf.Tensor] = lambda record: record,
) -> _Split:
  """A split whose examples are all in memory (images or file paths), in a fixed order."""

  def order(host: int, num_hosts: int, shuffle_seed: int | None, repeats: int) -> np.ndarray:
    if repeats > 1:
      everything = np.arange(len(records))
      if shuffle_seed is not None:
        everything = np.random.default_rng(shuffle_seed).permutation(everything)
      return repeated_share(everything, repeats, host, num_hosts)
    lo, hi = _host_range(len(records), host, num_hosts)
    indices = np.arange(lo, hi)
    if shuffle_seed is None:
      return indices
    return np.random.default_rng(shuffle_seed).permutation(indices)

  def host_sizes(num_hosts: int) -> list[int]:
    return [
      hi - lo for lo, hi in (_host_range(len(records), h, num_hosts) for h in range(num_hosts))
    ]

  def read(host: int, num_hosts: int, shuffle_seed: int | None, repeats: int) -> tf.data.Dataset:
    indices = order(host, num_hosts, shuffle_seed, repeats)
    return tf.data.Dataset.from_tensor_slices((records[indices], labels[indices]))

  def stream(
    host: int,
    num_hosts: int,
    repeats: int,
    seeds: Callable[[int], tuple[int, list[int]]],
    first_epoch: int,
    per_epoch: int,
  ) -> tf.data.Dataset:
    """(position in its epoch, augmentation key, record, label) of epoch after epoch, endlessly."""
    all_records, all_labels = tf.constant(records), tf.constant(labels)

    def epoch_plan(epoch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      shuffle_seed, key = seeds(int(epoch))
      indices = order(host, num_hosts, shuffle_seed, repeats)[:per_epoch]
      return indices.astype(np.int64), np.array(key, np.int64)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
      indices, key = tf.numpy_function(epoch_plan, [epoch], (tf.int64, tf.int64), stateful=False)
      indices = tf.ensure_shape(indices, [per_epoch])
      key = tf.ensure_shape(key, [2])
      return (
        tf.data.Dataset.from_tensor_slices(indices)
        .enumerate()
        .map(
          lambda position, i: (
            position,
            key,
            tf.gather(all_records, i),
            tf.gather(all_labels, i),
          )
        )
      )

    return tf.data.Dataset.range(first_epoch, 2**62).flat_map(one_epoch)

  def find_bad_file(
    host: int, num_hosts: int, shuffle_seed: int | None, repeats: int, start: int, stop: int
  ) -> str | None:
    if not paths:
      return None
    for index in order(host, num_hosts, shuffle_seed, repeats)[start:stop]:
      try:
        preprocessing.decode_image(load(tf.constant(records[index])))
      except Exception:  # eagerly, PIL's own error (OSError, ValueError, ...) or TF's OpError
        return str(records[index])
    return None

  return _Split(description, class_names, host_sizes, read, find_bad_file, load, stream=stream)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits as uint8 RGB [n, 8, 8, 3] and int32 labels, in the fixed split order."""
  import sklearn.datasets  # only this source needs it

  digits = sklearn.datasets.load_digits()
  gray = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)  # [n, 8, 8], 0..16 -> 0..255
  images = np.repeat(gray[..., None], 3, axis=-1)  # [n, 8, 8, 3]
  order = np.random.default_rng(0).permutation(len(images))  # fixed: never config.seed
  return images[order], digits.target[order].astype(np.int32)


def _digits_split(split: str) -> _Split:
  if split not in DIGITS_SPLITS:
    raise InputError(
      f"dataset 'digits' has no split {split!r}; its splits are {list(DIGITS_SPLITS)}"
    )
  images, labels = _digits()
  part = DIGITS_SPLITS[split]
  return _list_split(f'digits {split}', DIGITS_CLASSES, images[part], labels[part])


def _subfolders(path: str) -> list[str]:
  """Sorted class folder names; hidden ones (.ipynb_checkpoints, ...) are no class."""
  names = (n.rstrip('/') for n in tf.io.gfile.listdir(path) if not n.startswith('.'))
  return sorted(n for n in names if tf.io.gfile.isdir(os.path.join(path, n)))


def _folder_split(data_dir: str, split: str) -> _Split:
  """<data_dir>/<split>/<class>/<image>, labelled by the sorted class folder names."""
  if not data_dir:
    raise InputError("data.data_dir is empty: 'folder' needs the root holding the split folders")
  if not tf.io.gfile.isdir(data_dir):
    raise InputError(f'data_dir {data_dir} does not exist')
  root = os.path.join(data_dir, split)
  if not tf.io.gfile.isdir(root):
    raise InputError(f'split folder {root} does not exist (split {split!r} of data_dir {data_dir})')
  classes = _subfolders(root)
  if not classes:
    raise InputError(f'no class folders in {root}: expected {root}/<class>/<image>.JPEG')
  paths, labels = [], []
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    files = sorted(f for f in tf.io.gfile.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise InputError(f'class folder {folder} has no {"/".join(IMAGE_EXTENSIONS)} images')
    paths += [os.path.join(folder, f) for f in files]
    labels += [label] * len(files)
  return _list_split(
    f'folder {root}',
    tuple(classes),
    np.array(paths, dtype=object),  # str objects: leaner than a fixed-width array
    np.array(labels, dtype=np.int32),
    paths=True,
    load=tf.io.read_file,  # decoded by train_pixels and eval_pixels
  )


def _tfds_split(name: str, data_dir: str, split: str, shuffle_buffer: int) -> _Split:
  """A prepared TFDS split, shared out with tfds.even_splits as tfds.split_for_jax_process does."""
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.DatasetNotFoundError:
    raise InputError(
      f'unknown dataset {name!r}: not a TFDS dataset nor one of the built-in {list(BUILTIN_NAMES)}'
    ) from None
  except ValueError as error:
    raise InputError(f'cannot open TFDS dataset {name!r}: {str(error).splitlines()[0]}') from None
  root = data_dir or tfds.core.constants.DATA_DIR
  if not builder.is_prepared():
    manual = ''
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      files = ' (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar)' if 'imagenet' in name else ''
      manual = f'; it needs a manual download into {root}/downloads/manual first{files}'
    raise InputError(
      f'TFDS dataset {name!r} is not prepared in data_dir {root}: prepare it with '
      f'`tfds build {name} --data_dir={root}`{manual}'
    )
  features = builder.info.features
  missing = [key for key in ('image', 'label') if key not in features.keys()]
  if missing or not hasattr(features['label'], 'num_classes'):
    raise InputError(f"TFDS dataset {name!r} lacks an 'image' feature and a class 'label'")
  try:
    builder.info.splits[split]
  except (KeyError, ValueError):
    raise InputError(
      f'TFDS dataset {name!r} has no split {split!r}; its splits are {list(builder.info.splits)}'
    ) from None

  def host_split(host: int, num_hosts: int) -> tfds.typing.SplitArg:
    return tfds.even_splits(split, n=num_hosts)[host]

  def host_sizes(num_hosts: int) -> list[int]:
    return [builder.info.splits[host_split(h, num_hosts)].num_examples for h in range(num_hosts)]

  def read(host: int, num_hosts: int, shuffle_seed: int | None, repeats: int) -> tf.data.Dataset:
    whole = repeats > 1  # every process reads the whole split in the same order, then its turns
    ds = builder.as_dataset(
      split=split if whole else host_split(host, num_hosts),
      shuffle_files=shuffle_seed is not None,
      decoders={'image': tfds.decode.SkipDecoding()},  # decode after the resume skip
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, skip_prefetch=True),
    )
    ds = ds.map(lambda example: (example['image'], example['label']))
    if shuffle_seed is not None:
      ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed)
    if whole:
      num_examples = builder.info.splits[split].num_examples
      ds = _repeated_share_dataset(ds, num_examples, repeats, host, num_hosts)
    return ds

  class_names = tuple(features['label'].names)  # imagenet2012's are the wnids
  return _Split(f'TFDS {name} split {split!r}', class_names, host_sizes, read)
