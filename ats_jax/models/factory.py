"""`create_model`: the one public entry point from a variant name (and weights) to a model."""

from __future__ import annotations

import dataclasses
import inspect
import os

import jax.numpy as jnp
from flax import nnx

from ats_jax.convert import pretrained
from ats_jax.errors import CheckpointError
from ats_jax.models import registry, vit


def create_model(
  name: str, *, checkpoint: str | os.PathLike | None = None, seed: int = 0, **overrides
) -> vit.VisionTransformer:
  """Builds variant `name`; with `checkpoint` (converted dir, `.pth` or `.safetensors`) loads it.

  `overrides` replace architecture or runtime fields (`num_classes`, `img_size`, `dtype`,
  `layer_norm_eps`, ...). The class count and LayerNorm epsilon default to the checkpoint's. Loading
  is strict: every parameter must come from the checkpoint with the model's shape, and every
  checkpoint entry must be used. `model.data_config` is the eval preprocessing its inputs expect:
  what the checkpoint records, else the variant's (`registry.data_config`).
  """
  allowed = set(inspect.signature(vit.VisionTransformer.__init__).parameters) - {'self', 'rngs'}
  unknown = sorted(set(overrides) - allowed - {'layer_norm_eps'})
  if unknown:
    raise TypeError(f'unknown model options {unknown}; allowed: {sorted(allowed)}')
  kwargs = dataclasses.asdict(registry.get_spec(name))
  eps = overrides.pop('layer_norm_eps', None)
  if checkpoint is None:
    model = vit.VisionTransformer(**kwargs | overrides, rngs=nnx.Rngs(seed))
    set_layer_norm_eps(model, vit.LAYER_NORM_EPS if eps is None else eps)
    model.data_config = registry.data_config(name)
    return model
  loaded = pretrained.load_checkpoint(checkpoint, name)
  model = vit.abstract_model(**kwargs | dict(num_classes=loaded.num_classes) | overrides)
  set_layer_norm_eps(model, loaded.layer_norm_eps if eps is None else eps)
  load_params(model, loaded.params, f'{name} (from {checkpoint})')
  model.data_config = loaded.data
  return model


def set_layer_norm_eps(model: nnx.Module, eps: float) -> None:
  """Sets every LayerNorm's epsilon: timm's 1e-6 (vit.LAYER_NORM_EPS), Hugging Face's 1e-12."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.LayerNorm):
      module.epsilon = eps


def load_params(model: nnx.Module, params: dict, what: str) -> None:
  """Strictly replaces every parameter of `model` by `params[dotted_name]`, kept float32."""
  expected = vit.param_dict(model)
  missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
  if missing or unexpected:
    raise CheckpointError(
      f'parameters do not match {what}: missing {missing}, unexpected {unexpected}'
    )
  for key, param in expected.items():
    if tuple(params[key].shape) != tuple(param.shape):
      raise CheckpointError(
        f'{key} has shape {tuple(params[key].shape)} in the checkpoint but {what} expects '
        f'{tuple(param.shape)}'
      )
  flat = [
    (tuple(int(p) if p.isdigit() else p for p in key.split('.')), jnp.asarray(params[key]))
    for key in expected
  ]
  nnx.update(model, nnx.from_flat_state(flat))
