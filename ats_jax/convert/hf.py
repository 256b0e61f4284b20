"""Hugging Face `transformers` ViT/DeiT checkpoints -> a timm state dict, as a pure dict function.

A `save_pretrained` directory holds `config.json` (the architecture, `layer_norm_eps`: 1e-12 there)
and `model.safetensors` or `pytorch_model.bin`. Names as the Hub stores them
(`vit.encoder.layer.0.attention.attention.query.weight`, `deit.embeddings.distillation_token`,
`cls_classifier`/`distillation_classifier`) and as transformers 5 holds them in memory
(`vit.layers.0.attention.q_proj.weight`, `mlp.fc1`) both convert; query/key/value fuse into qkv.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from ats_jax.errors import CheckpointError
from ats_jax.models import registry

CONFIG_FILE = 'config.json'
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
PREPROCESSOR_FILE = 'preprocessor_config.json'
_PIL_RESAMPLE = {2: 'bilinear', 3: 'bicubic'}

# timm suffix <- alternatives (Hub names, transformers 5 names), within one block.
_BLOCK = {
  'norm1': ('layernorm_before',),
  'norm2': ('layernorm_after',),
  'attn.proj': ('attention.output.dense', 'attention.o_proj'),
  'mlp.fc1': ('intermediate.dense', 'mlp.fc1'),
  'mlp.fc2': ('output.dense', 'mlp.fc2'),
}
_QKV = {
  'query': ('attention.attention.query', 'attention.q_proj'),
  'key': ('attention.attention.key', 'attention.k_proj'),
  'value': ('attention.attention.value', 'attention.v_proj'),
}


@dataclasses.dataclass(frozen=True)
class HFModel:
  """What a Hugging Face checkpoint says about itself."""

  state_dict: dict[str, np.ndarray]  # timm names and layouts
  spec: registry.ViTSpec
  family: str | None  # 'deit' when the config says so; None: a ViT config, DeiT or AugReg weights
  layer_norm_eps: float
  data: registry.DataConfig | None  # from preprocessor_config.json, when the directory has one


def _check_config(config: Mapping) -> None:
  problems = []
  if config.get('model_type') not in ('vit', 'deit'):
    problems.append(f'model_type {config.get("model_type")!r} (expected vit or deit)')
  if config.get('hidden_act', 'gelu') != 'gelu':
    problems.append(f'hidden_act {config["hidden_act"]!r} (the models use exact GELU)')
  if not config.get('qkv_bias', True):
    problems.append('qkv_bias false')
  if config.get('num_channels', 3) != 3:
    problems.append(f'num_channels {config["num_channels"]}')
  if problems:
    raise CheckpointError(f'unsupported Hugging Face config: {"; ".join(problems)}')


def hf_to_timm(weights: Mapping[str, np.ndarray], config: Mapping) -> HFModel:
  """transformers ViT/DeiT weights and config -> timm state dict and architecture."""
  _check_config(config)
  base = config['model_type']
  p = f'{base}.'
  if not any(k.startswith(p) for k in weights):
    raise CheckpointError(f'config.json says {base} but no weight starts with {p!r}')
  used: set[str] = set()

  def get(*names: str) -> np.ndarray:
    for name in names:
      if name in weights:
        used.add(name)
        return np.asarray(weights[name], np.float32)
    raise CheckpointError(f'Hugging Face checkpoint lacks {names[0]}')

  distilled = f'{p}embeddings.distillation_token' in weights
  if distilled and 'cls_classifier.weight' not in weights:
    raise CheckpointError(
      'DeiTForImageClassification (without teacher) classifies from the cls token alone while '
      'its model has a distillation token; only DeiTForImageClassificationWithTeacher (both '
      'heads, averaged, as timm) converts'
    )
  emb = f'{p}embeddings.'
  sd = {
    'cls_token': get(emb + 'cls_token'),
    'pos_embed': get(emb + 'position_embeddings'),
    'patch_embed.proj.weight': get(emb + 'patch_embeddings.projection.weight'),
    'patch_embed.proj.bias': get(emb + 'patch_embeddings.projection.bias'),
    'norm.weight': get(p + 'layernorm.weight'),
    'norm.bias': get(p + 'layernorm.bias'),
  }
  if distilled:
    sd['dist_token'] = get(emb + 'distillation_token')
    heads = {'head': 'cls_classifier', 'head_dist': 'distillation_classifier'}
  else:
    heads = {'head': 'classifier'}
  for timm_name, hf_name in heads.items():
    sd[f'{timm_name}.weight'] = get(f'{hf_name}.weight')
    sd[f'{timm_name}.bias'] = get(f'{hf_name}.bias')
  depth = config['num_hidden_layers']
  for i in range(depth):
    blocks = (f'{p}encoder.layer.{i}.', f'{p}layers.{i}.')
    for leaf in ('weight', 'bias'):
      for timm_name, hf_names in _BLOCK.items():
        sd[f'blocks.{i}.{timm_name}.{leaf}'] = get(
          *(b + n + '.' + leaf for n in hf_names for b in blocks)
        )
      sd[f'blocks.{i}.attn.qkv.{leaf}'] = np.concatenate(
        [get(*(b + n + '.' + leaf for n in _QKV[part] for b in blocks)) for part in _QKV]
      )
  unused = sorted(set(weights) - used)
  if unused:
    raise CheckpointError(f'Hugging Face checkpoint entries no layer uses: {", ".join(unused[:8])}')
  hidden = config['hidden_size']
  spec = registry.ViTSpec(
    embed_dim=hidden,
    depth=depth,
    num_heads=config['num_attention_heads'],
    img_size=config['image_size'],
    patch_size=config['patch_size'],
    mlp_ratio=config['intermediate_size'] / hidden,
    num_classes=sd['head.weight'].shape[0],
    distilled=distilled,
  )
  return HFModel(
    sd, spec, 'deit' if base == 'deit' else None, float(config['layer_norm_eps']), None
  )


def data_config(pre: Mapping, img_size: int) -> registry.DataConfig:
  """preprocessor_config.json -> mean, std, crop_pct (crop over resize), interpolation."""
  crop_pct = 1.0
  if pre.get('do_center_crop'):
    size, crop = pre.get('size', {}), pre.get('crop_size', {})
    resize = size.get('shortest_edge') or size.get('height') if isinstance(size, dict) else size
    cropped = crop.get('height') if isinstance(crop, dict) else crop
    if resize and cropped:
      crop_pct = cropped / resize
  return registry.DataConfig(
    tuple(pre.get('image_mean', registry.INCEPTION_MEAN)),
    tuple(pre.get('image_std', registry.INCEPTION_STD)),
    round(crop_pct, 4),
    _PIL_RESAMPLE.get(pre.get('resample', 2), 'bilinear'),
  )
