"""Reading PyTorch/timm checkpoint files and the converted (orbax) checkpoint directory.

A converted directory holds `ats_jax.json` (which variant, its image size and classes, where it came
from) and `params/` (an orbax checkpoint of the Flax parameters, nested by timm's dotted names). It
is
written to a temporary sibling and renamed into place, so an error or an interruption never leaves a
half-written output directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import zipfile
from collections.abc import Mapping

import numpy as np

from ats_jax.models import registry, vit
from ats_jax.models.timm_convert import (
  CheckpointError,
  infer_model_name,
  resize_pos_embed,
  timm_to_flax,
)

METADATA_FILE = 'ats_jax.json'
PARAMS_DIR = 'params'
FORMAT = 'ats_jax.converted/1'
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.tar')
_WRAPPER_KEYS = ('model', 'state_dict', 'model_state')  # DeiT ships {'model': sd, ...}


@dataclasses.dataclass(frozen=True)
class Converted:
  """Flat Flax params (`blocks.0.attn.qkv.kernel` -> array) and what they are."""

  model: str
  params: dict[str, np.ndarray]
  num_classes: int
  img_size: int
  source: str
  notes: tuple[str, ...] = ()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A timm-style state dict from a `.pth`/`.pt`/`.bin` or `.safetensors` file, as float32 NumPy."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f'no such file: {path}')
  if path.is_dir():
    raise CheckpointError(
      f'{path} is a directory without {METADATA_FILE}: not a converted checkpoint'
    )
  if path.suffix == '.safetensors':
    return _read_safetensors(path)
  return _unwrap(_read_torch(path), path)


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  try:
    return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f'{path} is truncated or not a safetensors file ({e})') from None


def _read_torch(path: pathlib.Path) -> object:
  try:
    import torch
  except ImportError:
    raise CheckpointError(
      f'reading {path.suffix} files needs PyTorch: pip install -r requirements-test.txt, '
      'or convert to .safetensors first'
    ) from None
  with open(path, 'rb') as f:
    magic = f.read(2)
  if not (magic == b'PK' or magic[:1] == b'\x80'):  # torch's zip format, or the legacy pickle
    raise CheckpointError(
      f'{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)'
    )
  if magic == b'PK' and not zipfile.is_zipfile(path):
    raise CheckpointError(f'{path} is truncated or corrupt (its zip directory is unreadable)')
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... here
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f'{path} is truncated or corrupt ({first_line})') from None


def _unwrap(obj: object, path: pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict inside DeiT's `{'model': ...}` wrapper (or a bare one), as NumPy arrays."""
  import torch

  for key in _WRAPPER_KEYS:
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping) or not obj:
    raise CheckpointError(f'{path} does not hold a state dict (found {type(obj).__name__})')
  not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
  if not_tensors:
    raise CheckpointError(
      f'{path} does not hold a state dict: non-tensor entries {", ".join(not_tensors)}'
    )
  if all(k.startswith('module.') for k in obj):  # saved from DistributedDataParallel
    obj = {k.removeprefix('module.'): v for k, v in obj.items()}
  return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray], model: str | None = None, source: str = ''
) -> Converted:
  """timm state dict -> Flax params for `model` (inferred from shapes when None).

  The head's class count is taken from the checkpoint; `pos_embed` is resized (bicubic, prefix
  tokens kept) when the checkpoint's image size differs from the variant's.
  """
  name = model or infer_model_name(state_dict)
  spec = registry.get_spec(name)
  state_dict = dict(state_dict)
  notes = []
  num_prefix = 2 if spec.distilled else 1
  grid = spec.img_size // spec.patch_size
  pos = state_dict.get('pos_embed')
  if pos is not None and pos.ndim == 3 and pos.shape[1] != grid * grid + num_prefix:
    old = pos.shape[1] - num_prefix
    state_dict['pos_embed'] = resize_pos_embed(pos, grid, num_prefix)
    notes.append(f'pos_embed resized from {old} to {grid * grid} patches (bicubic, prefix kept)')
  head = state_dict.get('head.weight')
  num_classes = head.shape[0] if head is not None and head.ndim == 2 else spec.num_classes
  abstract = vit.abstract_model(**dataclasses.asdict(spec) | dict(num_classes=num_classes))
  expected = {k: v.shape for k, v in vit.param_dict(abstract).items()}
  params = timm_to_flax(state_dict, expected, name)
  return Converted(name, params, num_classes, spec.img_size, source, tuple(notes))


def save_converted(
  converted: Converted, out_dir: str | os.PathLike, *, force: bool = False
) -> None:
  """Writes `converted` as a checkpoint directory, atomically; replaces one only with `force`."""
  import orbax.checkpoint as ocp

  out_dir = pathlib.Path(out_dir).absolute()  # orbax wants absolute paths
  if out_dir.exists() and not force:
    raise CheckpointError(f'output directory {out_dir} already exists (use --force to replace it)')
  tmp = out_dir.with_name(f'.{out_dir.name}.tmp-{os.getpid()}')
  try:
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:  # async: the context waits for the commit
      checkpointer.save(tmp / PARAMS_DIR, _nest(converted.params))
    meta = dict(
      format=FORMAT,
      model=converted.model,
      img_size=converted.img_size,
      num_classes=converted.num_classes,
      source=converted.source,
      notes=list(converted.notes),
    )
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + '\n')
    if out_dir.exists():
      shutil.rmtree(out_dir)
    tmp.rename(out_dir)
  finally:
    with contextlib.suppress(FileNotFoundError):
      shutil.rmtree(tmp)


def load_converted(ckpt_dir: str | os.PathLike) -> Converted:
  """Reads a directory written by `save_converted` (the `python -m convert` output)."""
  import orbax.checkpoint as ocp

  ckpt_dir = pathlib.Path(ckpt_dir).absolute()
  meta_file = ckpt_dir / METADATA_FILE
  if not meta_file.is_file():
    raise CheckpointError(
      f'{ckpt_dir} is not a converted checkpoint (no {METADATA_FILE}); '
      'convert it with `python -m convert`'
    )
  meta = json.loads(meta_file.read_text())
  if meta.get('format') != FORMAT:
    raise CheckpointError(f'{meta_file} has format {meta.get("format")!r}, expected {FORMAT!r}')
  with ocp.StandardCheckpointer() as checkpointer:
    nested = checkpointer.restore(ckpt_dir / PARAMS_DIR)
  params = {k: np.asarray(v) for k, v in _flatten(nested).items()}
  return Converted(
    meta['model'],
    params,
    meta['num_classes'],
    meta['img_size'],
    meta['source'],
    tuple(meta['notes']),
  )


def load_checkpoint(path: str | os.PathLike, model: str | None = None) -> Converted:
  """A converted directory as it is, or a PyTorch/safetensors file converted on the fly."""
  path = pathlib.Path(path)
  if (path / METADATA_FILE).is_file():
    return load_converted(path)
  return convert_state_dict(read_state_dict(path), model, source=str(path))


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
  nested: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split('.')
    node = nested
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return nested


def _flatten(nested: Mapping, prefix: str = '') -> dict[str, np.ndarray]:
  flat = {}
  for key, value in nested.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat
