"""Google's JAX ViT `.npz` checkpoints -> a timm state dict, as timm's `_load_weights` reads them.

Two naming schemes: google-research/vision_transformer (`Transformer/encoderblock_{i}/`,
`MultiHeadDotProductAttention_1`, `MlpBlock_3`, `LayerNorm_0/2`, the position embedding under
`Transformer/posembed_input` with the cls slot; optionally under `opt/target/`) and big_vision
(`params/` or `params/img/`, blocks stacked along a leading depth axis in
`Transformer/encoderblock/`, `MultiHeadDotProductAttention_0`, `MlpBlock_0`, `LayerNorm_0/1`,
`pos_embedding` without the cls slot). Attention kernels are per head: query/key/value
[D, H, d], out [H, d, D].

Only class-token models convert: ATS scores tokens by the cls row of attention, so a model that
pools by GAP or a MAP head (no `cls`) has nothing to score with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ats_jax.errors import CheckpointError

_PREFIXES = ('opt/target/', 'params/', 'params/img/')


def npz_to_timm(w: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
  """The timm state dict (PyTorch layouts) of a JAX ViT checkpoint, and its number of heads."""
  prefix = next((p for p in _PREFIXES if f'{p}embedding/kernel' in w), '')
  if f'{prefix}embedding/kernel' not in w:
    raise CheckpointError('not a JAX ViT checkpoint: no embedding/kernel')
  big_vision = (
    prefix.startswith('params/')
    or f'{prefix}pos_embedding' in w
    or f'{prefix}Transformer/encoderblock/LayerNorm_0/scale' in w
  )
  used: set[str] = set()

  def get(key: str, idx: int | None = None) -> np.ndarray:
    full = prefix + key
    if full not in w:
      raise CheckpointError(f'not a ViT checkpoint timm reads: missing {full}')
    used.add(full)
    value = np.asarray(w[full], np.float32)
    return value if idx is None else value[idx]

  if f'{prefix}MAPHead_0/probe' in w or f'{prefix}cls' not in w:
    how = 'a MAP head' if f'{prefix}MAPHead_0/probe' in w else 'GAP (it has no cls token)'
    raise CheckpointError(
      f'this model pools by {how}; ATS scores tokens with the cls row of attention, so only '
      'class-token ViTs convert'
    )
  if f'{prefix}pre_logits/kernel' in w:
    raise CheckpointError(
      'this checkpoint has a pre_logits layer (an ImageNet-21k representation head), which the '
      'registered ViTs lack; use a fine-tuned checkpoint without one'
    )
  if f'{prefix}head/kernel' not in w:
    raise CheckpointError('this checkpoint has no classification head (head/kernel)')

  sd = {
    'patch_embed.proj.weight': get('embedding/kernel').transpose(3, 2, 0, 1),  # HWIO -> OIHW
    'patch_embed.proj.bias': get('embedding/bias'),
    'cls_token': get('cls').reshape(1, 1, -1),
    'norm.weight': get('Transformer/encoder_norm/scale'),
    'norm.bias': get('Transformer/encoder_norm/bias'),
    'head.weight': get('head/kernel').T,
    'head.bias': get('head/bias'),
  }
  embed_dim = sd['cls_token'].shape[-1]
  pos = get('pos_embedding' if big_vision else 'Transformer/posembed_input/pos_embedding')
  pos = pos.reshape(1, -1, embed_dim)
  if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:  # no cls slot: the cls token gets no position
    pos = np.concatenate([np.zeros((1, 1, embed_dim), np.float32), pos], axis=1)
  sd['pos_embed'] = pos

  stacked = f'{prefix}Transformer/encoderblock/LayerNorm_0/scale' in w
  if stacked:
    depth = w[f'{prefix}Transformer/encoderblock/LayerNorm_0/scale'].shape[0]
  else:
    depth = sum(f'{prefix}Transformer/encoderblock_{i}/LayerNorm_0/scale' in w for i in range(1000))
  mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
  num_heads = 0
  for i in range(depth):
    block, idx = (
      ('Transformer/encoderblock/', i) if stacked else (f'Transformer/encoderblock_{i}/', None)
    )
    att = f'{block}MultiHeadDotProductAttention_{mha}/'
    q, k, v = (get(f'{att}{n}/kernel', idx) for n in ('query', 'key', 'value'))  # [D, H, d]
    num_heads = q.shape[1]
    out = get(f'{att}out/kernel', idx)  # [H, d, D]
    t = f'blocks.{i}.'
    sd |= {
      t + 'norm1.weight': get(f'{block}LayerNorm_0/scale', idx),
      t + 'norm1.bias': get(f'{block}LayerNorm_0/bias', idx),
      t + 'attn.qkv.weight': np.concatenate([x.reshape(embed_dim, -1).T for x in (q, k, v)]),
      t + 'attn.qkv.bias': np.concatenate(
        [get(f'{att}{n}/bias', idx).reshape(-1) for n in ('query', 'key', 'value')]
      ),
      t + 'attn.proj.weight': out.reshape(-1, embed_dim).T,  # [D, H*d]
      t + 'attn.proj.bias': get(f'{att}out/bias', idx),
      t + 'norm2.weight': get(f'{block}LayerNorm_{ln2}/scale', idx),
      t + 'norm2.bias': get(f'{block}LayerNorm_{ln2}/bias', idx),
    }
    for r in range(2):
      sd[f'{t}mlp.fc{r + 1}.weight'] = get(f'{block}MlpBlock_{mlp}/Dense_{r}/kernel', idx).T
      sd[f'{t}mlp.fc{r + 1}.bias'] = get(f'{block}MlpBlock_{mlp}/Dense_{r}/bias', idx)
  unused = sorted(k for k in w if k.startswith(prefix) and k not in used)
  if unused:
    raise CheckpointError(f'checkpoint entries no ViT layer uses: {", ".join(unused[:8])}')
  return sd, num_heads
