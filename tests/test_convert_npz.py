"""JAX ViT `.npz` checkpoints (vision_transformer and big_vision naming) convert to the logits timm
gives after its own `_load_weights` of the same file."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import timm
from flax import nnx
from timm.models.vision_transformer import _load_weights

import convert.__main__ as convert_cli
from ats_jax.models import create_model, registry
from tests.conftest import random_timm_model, timm_logits

NAME = 'vit_tiny_patch16_224'


def to_npz(state_dict, scheme: str, prefix: str) -> dict[str, np.ndarray]:
  """A timm ViT state dict in Google's JAX naming: per-head attention kernels, HWIO patch kernel.

  'vision_transformer': `encoderblock_{i}` with MultiHeadDotProductAttention_1 / MlpBlock_3 /
  LayerNorm_0,2 and the position embedding with its cls slot; 'big_vision': blocks stacked in
  `encoderblock`, MultiHeadDotProductAttention_0 / MlpBlock_0 / LayerNorm_0,1, `pos_embedding`
  without the cls slot.
  """
  sd = {k: v.detach().numpy() for k, v in state_dict.items()}
  dim = sd['cls_token'].shape[-1]
  heads = registry.get_spec(NAME).num_heads
  w = {
    'embedding/kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
    'embedding/bias': sd['patch_embed.proj.bias'],
    'cls': sd['cls_token'],
    'Transformer/encoder_norm/scale': sd['norm.weight'],
    'Transformer/encoder_norm/bias': sd['norm.bias'],
    'head/kernel': sd['head.weight'].T,
    'head/bias': sd['head.bias'],
  }
  big_vision = scheme == 'big_vision'
  if big_vision:
    w['pos_embedding'] = sd['pos_embed'][:, 1:]
  else:
    w['Transformer/posembed_input/pos_embedding'] = sd['pos_embed']
  mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
  blocks = []
  for i in range(len({k.split('.')[1] for k in sd if k.startswith('blocks.')})):
    t = f'blocks.{i}.'
    qkv_w, qkv_b = sd[t + 'attn.qkv.weight'], sd[t + 'attn.qkv.bias']
    b = {
      'LayerNorm_0/scale': sd[t + 'norm1.weight'],
      'LayerNorm_0/bias': sd[t + 'norm1.bias'],
      f'LayerNorm_{ln2}/scale': sd[t + 'norm2.weight'],
      f'LayerNorm_{ln2}/bias': sd[t + 'norm2.bias'],
      f'MultiHeadDotProductAttention_{mha}/out/kernel': sd[t + 'attn.proj.weight'].T.reshape(
        heads, dim // heads, dim
      ),
      f'MultiHeadDotProductAttention_{mha}/out/bias': sd[t + 'attn.proj.bias'],
    }
    for j, n in enumerate(('query', 'key', 'value')):
      kernel = qkv_w[j * dim : (j + 1) * dim].T.reshape(dim, heads, dim // heads)
      b[f'MultiHeadDotProductAttention_{mha}/{n}/kernel'] = kernel
      b[f'MultiHeadDotProductAttention_{mha}/{n}/bias'] = qkv_b[j * dim : (j + 1) * dim].reshape(
        heads, -1
      )
    for r in range(2):
      b[f'MlpBlock_{mlp}/Dense_{r}/kernel'] = sd[f'{t}mlp.fc{r + 1}.weight'].T
      b[f'MlpBlock_{mlp}/Dense_{r}/bias'] = sd[f'{t}mlp.fc{r + 1}.bias']
    blocks.append(b)
  if big_vision:
    for key in blocks[0]:
      w[f'Transformer/encoderblock/{key}'] = np.stack([b[key] for b in blocks])
  else:
    for i, b in enumerate(blocks):
      w |= {f'Transformer/encoderblock_{i}/{k}': v for k, v in b.items()}
  return {prefix + k: v for k, v in w.items()}


def write_npz(tmp_path, scheme: str, prefix: str, seed: int = 0, drop=(), add=None):
  w = to_npz(random_timm_model(NAME, seed=seed).state_dict(), scheme, prefix)
  w = {k: v for k, v in w.items() if k.removeprefix(prefix) not in drop} | (add or {})
  path = tmp_path / f'{scheme}.npz'
  np.savez(path, **w)
  return path


@pytest.mark.parametrize(
  'scheme,prefix',
  [('vision_transformer', ''), ('vision_transformer', 'opt/target/'), ('big_vision', 'params/')],
)
def test_npz_matches_timms_load_weights(tmp_path, images, capsys, scheme, prefix):
  src = write_npz(tmp_path, scheme, prefix)
  # big_vision adds positions before prepending cls: timm models that as no_embed_class.
  reference = timm.create_model(NAME, pretrained=False, no_embed_class=scheme == 'big_vision')
  _load_weights(reference.eval(), str(src))
  out = tmp_path / 'converted'
  assert convert_cli.main([str(src), str(out)]) == 0  # .npz is AugReg/original ViT: vit_* inferred
  meta = json.loads((out / 'ats_jax.json').read_text())
  assert meta['model'] == NAME
  assert meta['data'] == registry.VIT_DATA_224.to_json()
  assert meta['data']['mean'] == [0.5, 0.5, 0.5] and meta['data']['crop_pct'] == 0.9
  assert 'preprocess  mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5), crop_pct 0.9, bicubic' in (
    capsys.readouterr().out
  )

  x = images(batch=2)
  model = create_model(NAME, checkpoint=out)
  model.eval()
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
  expected = timm_logits(reference, x)
  print(f'{scheme} {prefix!r}: max |logit diff| {np.abs(got - expected).max():.2e}')
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  assert np.abs(expected).max() > 0.5


@pytest.mark.parametrize(
  'drop,add,message',
  [
    (('cls',), None, 'pools by GAP'),
    ((), {'params/MAPHead_0/probe': np.zeros((1, 1, 192))}, 'pools by a MAP head'),
    ((), {'params/pre_logits/kernel': np.zeros((192, 192))}, 'pre_logits'),
    (('head/kernel', 'head/bias'), None, 'no classification head'),
    ((), {'params/Transformer/extra/scale': np.zeros(3)}, 'no ViT layer uses'),
  ],
)
def test_npz_that_cannot_serve_ats_ends_with_one_error_line(tmp_path, capsys, drop, add, message):
  src = write_npz(tmp_path, 'big_vision', 'params/', drop=drop, add=add)
  assert convert_cli.main([str(src), str(tmp_path / 'out')]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
  assert not (tmp_path / 'out').exists()
