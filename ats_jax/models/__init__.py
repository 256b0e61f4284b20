"""Public model API: `create_model(name, checkpoint=..., **overrides)` and the zoo."""

from ats_jax.errors import CheckpointError
from ats_jax.models.factory import create_model, load_params
from ats_jax.models.registry import MODELS, ViTSpec, get_spec, list_models
from ats_jax.models.vit import VisionTransformer

__all__ = [
  'MODELS',
  'CheckpointError',
  'ViTSpec',
  'VisionTransformer',
  'create_model',
  'get_spec',
  'list_models',
  'load_params',
]
