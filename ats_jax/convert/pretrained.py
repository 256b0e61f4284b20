"""Reading source checkpoints (timm/DeiT `.pth` and `.safetensors`, JAX `.npz`, Hugging Face
directories) and the converted (orbax) checkpoint directory.

A converted directory holds `ats_jax.json` (which variant, its image size and classes (their names
where the source records them), where it came from, the preprocessing its weights expect and its
LayerNorm epsilon) and `params/` (an orbax
checkpoint of the Flax parameters, nested by timm's dotted names). It is written to a temporary
sibling and renamed into place, so an error or an interruption never leaves a half-written output
directory.
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

from ats_jax.convert import big_vision, torch_pickle
from ats_jax.convert import hf as hf_convert
from ats_jax.convert.timm import (
  infer_model_name,
  resize_pos_embed,
  timm_to_flax,
)
from ats_jax.data import labels
from ats_jax.errors import CheckpointError
from ats_jax.models import registry, vit

METADATA_FILE = 'ats_jax.json'
PARAMS_DIR = 'params'
FORMAT = 'ats_jax.converted/1'
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.tar')
_WRAPPER_KEYS = ('model', 'state_dict', 'model_state')  # DeiT ships {'model': sd, ...}


@dataclasses.dataclass(frozen=True)
class Converted:
  """Flat Flax params (`blocks.0.attn.qkv.kernel` -> array), what they are, and how images must
  be prepared for them (`data`) and normalised inside them (`layer_norm_eps`)."""

  model: str
  params: dict[str, np.ndarray]
  num_classes: int
  img_size: int
  source: str
  notes: tuple[str, ...] = ()
  data: registry.DataConfig | None = None  # None: the variant's (`registry.data_config`)
  layer_norm_eps: float = vit.LAYER_NORM_EPS
  labels: tuple[str, ...] | None = None  # each output's class name (HF id2label); None: unnamed

  def __post_init__(self):
    if self.data is None:
      object.__setattr__(self, 'data', registry.data_config(self.model))


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A timm-style state dict from a `.pth`/`.pt`/`.bin` or `.safetensors` file, as float32 NumPy."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f'no such file: {path}')
  if path.is_dir():
    raise CheckpointError(
      f'{path} is a directory but not a converted checkpoint (no {METADATA_FILE}) nor a '
      f'Hugging Face one (no {hf_convert.CONFIG_FILE})'
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
  """`torch.save` output read with NumPy (`torch_pickle`): no PyTorch needed, nothing executed."""
  with open(path, 'rb') as f:
    magic = f.read(2)
  if not (magic == b'PK' or magic[:1] == b'\x80'):  # torch's zip format, or the legacy pickle
    raise CheckpointError(
      f'{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)'
    )
  if magic == b'PK' and not zipfile.is_zipfile(path):
    raise CheckpointError(f'{path} is truncated or corrupt (its zip directory is unreadable)')
  try:
    return torch_pickle.load(path)
  except torch_pickle.TorchPickleError as e:
    raise CheckpointError(f'{path}: {e}') from None


def _unwrap(obj: object, path: pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict inside DeiT's `{'model': ...}` wrapper (or a bare one), as float32 arrays."""
  for key in _WRAPPER_KEYS:
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping) or not obj:
    raise CheckpointError(f'{path} does not hold a state dict (found {type(obj).__name__})')
  not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, np.ndarray))
  if not_tensors:
    raise CheckpointError(
      f'{path} does not hold a state dict: non-tensor entries {", ".join(not_tensors)}'
    )
  if all(k.startswith('module.') for k in obj):  # saved from DistributedDataParallel
    obj = {k.removeprefix('module.'): v for k, v in obj.items()}
  return {k: np.asarray(v, np.float32) for k, v in obj.items()}


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray],
  model: str | None = None,
  source: str = '',
  *,
  family: str | None = None,
  num_heads: int | None = None,
  data: registry.DataConfig | None = None,
  layer_norm_eps: float = vit.LAYER_NORM_EPS,
) -> Converted:
  """timm state dict -> Flax params for `model` (inferred from shapes, `family`, `num_heads`).

  The head's class count is taken from the checkpoint; `pos_embed` is resized (bicubic, prefix
  tokens kept) when the checkpoint's image size differs from the variant's. `data`: the
  checkpoint's preprocessing when it records one, else the variant's.
  """
  name = model or infer_model_name(state_dict, family, num_heads)
  spec = registry.get_spec(name)
  if num_heads is not None and num_heads != spec.num_heads:
    raise CheckpointError(f'the checkpoint has {num_heads} heads but {name} has {spec.num_heads}')
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
  return Converted(
    name, params, num_classes, spec.img_size, source, tuple(notes), data, layer_norm_eps
  )


def convert_file(path: str | os.PathLike, model: str | None = None) -> Converted:
  """Any source checkpoint -> Converted: a timm/DeiT `.pth`/`.safetensors`, a JAX `.npz`
  (big_vision / vision_transformer), or a Hugging Face directory."""
  path = pathlib.Path(path)
  if path.is_dir() and (path / hf_convert.CONFIG_FILE).is_file():
    return _convert_hf(path, model)
  if path.suffix == '.npz' and path.is_file():
    try:
      with np.load(path) as npz:
        weights = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
      raise CheckpointError(f'{path} is truncated or not a .npz file ({e})') from None
    state_dict, num_heads = big_vision.npz_to_timm(weights)
    return convert_state_dict(
      state_dict, model, str(path), family=None if model else 'vit', num_heads=num_heads
    )
  return convert_state_dict(read_state_dict(path), model, source=str(path))


def _convert_hf(path: pathlib.Path, model: str | None) -> Converted:
  config = json.loads((path / hf_convert.CONFIG_FILE).read_text())
  weight_files = [path / f for f in hf_convert.WEIGHT_FILES if (path / f).is_file()]
  if not weight_files:
    raise CheckpointError(
      f'{path} has {hf_convert.CONFIG_FILE} but neither of {", ".join(hf_convert.WEIGHT_FILES)}'
    )
  src = weight_files[0]
  weights = _read_safetensors(src) if src.suffix == '.safetensors' else _read_torch(src)
  if not isinstance(weights, Mapping):
    raise CheckpointError(f'{src} does not hold a state dict')
  hf = hf_convert.hf_to_timm(weights, config)
  data = None
  if (path / hf_convert.PREPROCESSOR_FILE).is_file():
    pre = json.loads((path / hf_convert.PREPROCESSOR_FILE).read_text())
    data = hf_convert.data_config(pre, hf.spec.img_size)
  converted = convert_state_dict(
    hf.state_dict,
    model,
    str(path),
    family=None if model else hf.family,
    num_heads=hf.spec.num_heads,
    data=data,
    layer_norm_eps=hf.layer_norm_eps,
  )
  names = labels.hf_names(config.get('id2label'), converted.num_classes)
  return dataclasses.replace(converted, labels=names)


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
      data=converted.data.to_json(),
      layer_norm_eps=converted.layer_norm_eps,
    )
    if converted.labels is not None:
      meta['labels'] = list(converted.labels)
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + '\n')
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
    registry.DataConfig.from_json(meta['data']) if 'data' in meta else None,
    meta.get('layer_norm_eps', vit.LAYER_NORM_EPS),
    tuple(meta['labels']) if 'labels' in meta else None,
  )


def load_checkpoint(path: str | os.PathLike, model: str | None = None) -> Converted:
  """A converted directory as it is, or a source checkpoint converted on the fly."""
  path = pathlib.Path(path)
  if (path / METADATA_FILE).is_file():
    return load_converted(path)
  return convert_file(path, model)


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
