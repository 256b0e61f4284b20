"""Reading `torch.save` files with NumPy alone: PyTorch is not needed to convert a `.pth`.

Both formats `torch.save` writes are read: the zip archive (PyTorch >= 1.6: `data.pkl` plus one
raw file per storage) and the legacy stream (`_use_new_zipfile_serialization=False`: pickles, then
the storages' bytes). The unpickler admits only what a tensor state dict needs: the tensor and
parameter rebuild functions, typed storages and their dtypes, and `OrderedDict` (besides pickle's
own containers and scalars). Anything else (an optimizer's `argparse.Namespace`, arbitrary code)
is refused before it is constructed, as `torch.load(weights_only=True)` refuses it.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import struct
import zipfile
from collections.abc import Callable

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001

_DTYPES = {
  'float32': np.float32,
  'float64': np.float64,
  'float16': np.float16,
  'bfloat16': ml_dtypes.bfloat16,
  'int64': np.int64,
  'int32': np.int32,
  'int16': np.int16,
  'int8': np.int8,
  'uint8': np.uint8,
  'bool': np.bool_,
}
_STORAGES = {
  'FloatStorage': 'float32',
  'DoubleStorage': 'float64',
  'HalfStorage': 'float16',
  'BFloat16Storage': 'bfloat16',
  'LongStorage': 'int64',
  'IntStorage': 'int32',
  'ShortStorage': 'int16',
  'CharStorage': 'int8',
  'ByteStorage': 'uint8',
  'BoolStorage': 'bool',
  'UntypedStorage': 'uint8',
}


class TorchPickleError(ValueError):
  """The file is not a tensor state dict this reader admits; the message says why."""


class _StorageType:
  def __init__(self, dtype: str):
    self.dtype = np.dtype(_DTYPES[dtype])


class _Storage:
  """One storage: its dtype and length now, its bytes once read (legacy files keep them last)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel, self.array = dtype, numel, None


class _LazyTensor:
  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple, dtype=None):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)
    self.dtype = storage.dtype if dtype is None else np.dtype(dtype)

  def materialize(self) -> np.ndarray:
    array = self.storage.array
    if self.dtype != array.dtype:  # v3 tensors: an untyped (byte) storage viewed as `dtype`
      array = array.view(self.dtype)
    if any(s < 0 for s in (self.offset, *self.size, *self.stride)):
      raise TorchPickleError('a tensor has a negative offset, size or stride')
    if all(self.size):  # the last element a view reaches must lie inside its storage
      last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
      if last >= array.size:
        raise TorchPickleError('a tensor reaches past the end of its storage')
    itemsize = array.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
      array[self.offset :] if all(self.size) else array[:0],
      shape=self.size,
      strides=tuple(s * itemsize for s in self.stride),
      writeable=False,
    )
    return np.array(view)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, meta=None):
  return _LazyTensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, meta=None):
  return _LazyTensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  return data


_ALLOWED: dict[tuple[str, str], Callable | type] = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch._utils', '_rebuild_tensor'): _rebuild_tensor_v2,  # same arguments, no hooks
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
  ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  """pickle.Unpickler that constructs nothing outside `_ALLOWED`, storages and dtypes."""

  def __init__(self, file, load_storage: Callable[[tuple], _Storage]):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module in ('torch', 'torch.storage') and name in _STORAGES:
      return _StorageType(_STORAGES[name])
    if module == 'torch' and name in _DTYPES:  # dtypes, as _rebuild_tensor_v3 takes them
      return np.dtype(_DTYPES[name])
    raise TorchPickleError(
      f'it refers to {module}.{name}, which a tensor state dict never needs (refused, as '
      'torch.load(weights_only=True) refuses it); re-save only the weights, e.g. '
      "torch.save(checkpoint['model'], 'weights.pth')"
    )

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise TorchPickleError(f'unknown persistent id {pid!r:.60}')
    if not isinstance(pid[1], _StorageType):
      raise TorchPickleError(f'storage of unknown type {pid[1]!r:.60}')
    return self._load_storage(pid)


def _materialize(obj):
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    out = type(obj)((k, _materialize(v)) for k, v in obj.items())
    return out
  if isinstance(obj, list | tuple):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def load(path: str | pathlib.Path) -> object:
  """What `torch.load(path, weights_only=True)` returns, with NumPy arrays for tensors."""
  path = pathlib.Path(path)
  try:
    if zipfile.is_zipfile(path):
      return _materialize(_load_zip(path))
    return _materialize(_load_legacy(path))
  except TorchPickleError:
    raise
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, struct.error) as e:
    raise TorchPickleError(f'it is truncated or corrupt ({type(e).__name__}: {e})') from None
  except (ValueError, TypeError, AttributeError, IndexError) as e:
    raise TorchPickleError(f'it is corrupt ({type(e).__name__}: {e})') from None


def _load_zip(path: pathlib.Path) -> object:
  with zipfile.ZipFile(path) as zf:
    pickles = [n for n in zf.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pickles) != 1:
      raise TorchPickleError(
        f'it is a zip archive but not torch.save output ({len(pickles)} data.pkl)'
      )
    root = pickles[0].removesuffix('data.pkl')
    byteorder = 'little'
    if f'{root}byteorder' in zf.namelist():
      byteorder = zf.read(f'{root}byteorder').decode().strip()
    storages: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
      _, storage_type, key, _location, numel = pid
      if key not in storages:
        dtype = storage_type.dtype.newbyteorder('<' if byteorder == 'little' else '>')
        storage = _Storage(dtype, int(numel))
        data = zf.read(f'{root}data/{key}')
        if len(data) < storage.numel * dtype.itemsize:
          raise TorchPickleError(f'storage {key} holds fewer bytes than its tensors need')
        storage.array = np.frombuffer(data, dtype, count=storage.numel).astype(
          dtype.newbyteorder('=')
        )
        storages[key] = storage
      return storages[key]

    return _Unpickler(io.BytesIO(zf.read(pickles[0])), load_storage).load()


def _load_legacy(path: pathlib.Path) -> object:
  with open(path, 'rb') as f:
    header = _Unpickler(f, _no_storage)
    if header.load() != LEGACY_MAGIC:
      raise TorchPickleError('it is neither a zip archive nor a legacy torch.save stream')
    if header.load() != LEGACY_PROTOCOL:
      raise TorchPickleError('it is a legacy torch.save stream of an unknown protocol version')
    sys_info = header.load()
    if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
      raise TorchPickleError('it was saved on a big-endian machine; re-save it with torch.save')
    storages: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
      _, storage_type, key, _location, numel, view = pid
      if view is not None:
        raise TorchPickleError('it holds storage views (PyTorch < 0.4); re-save it with torch.save')
      if key not in storages:
        storages[key] = _Storage(storage_type.dtype, int(numel))
      return storages[key]

    obj = _Unpickler(f, load_storage).load()
    keys = _Unpickler(f, _no_storage).load()
    for key in keys:
      storage = storages[key]
      (numel,) = struct.unpack('<q', f.read(8))
      data = f.read(numel * storage.dtype.itemsize)
      if numel < storage.numel or len(data) < numel * storage.dtype.itemsize:
        raise TorchPickleError(f'storage {key} holds fewer bytes than its tensors need')
      storage.array = np.frombuffer(data, storage.dtype)
    if any(s.array is None for s in storages.values()):
      raise TorchPickleError('it lacks the data of some storages (truncated)')
    return obj


def _no_storage(pid: tuple) -> _Storage:
  raise TorchPickleError('a storage where only plain values belong')
