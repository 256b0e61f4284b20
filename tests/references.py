"""The PyTorch references the tests compare against (timm, transformers), with random weights, and
the checkpoint files they write (DeiT `.pth`, safetensors, JAX `.npz`).

Imported by `conftest.py` before anything imports TensorFlow: torch's triton loaded after
TensorFlow crashes the interpreter.
"""

from __future__ import annotations

import numpy as np
import safetensors.torch
import timm
import torch
import transformers  # a test requirement: a missing reference fails, never skips

from ats_jax.models import registry

NPZ_NAME = 'vit_tiny_patch16_224'  # the variant the `.npz` writers serialise


def random_timm_model(name: str, seed: int = 0) -> torch.nn.Module:
  """timm's `name` in eval mode with every parameter perturbed, so no weight is a trivial 0 or 1."""
  torch.manual_seed(seed)
  return perturbed(timm.create_model(name, pretrained=False))


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
  """`model` in eval mode with N(0, 0.05) noise on every parameter (seed the generator first)."""
  model.eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.05)
  return model


def timm_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  """timm's logits for NHWC images."""
  with torch.no_grad():
    return model(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)).numpy()


def save_checkpoint(model: torch.nn.Module, path_stem, fmt: str) -> str:
  """Saves the state dict as DeiT releases it (`{'model': sd}`), bare, or as safetensors."""
  state_dict = model.state_dict()
  if fmt == 'safetensors':
    path = f'{path_stem}.safetensors'
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
  else:
    path = f'{path_stem}.pth'
    torch.save({'model': state_dict, 'epoch': 300} if fmt == 'deit_pth' else state_dict, path)
  return path


HF_TINY = dict(
  hidden_size=192,
  num_hidden_layers=12,
  num_attention_heads=3,
  intermediate_size=768,
  image_size=224,
  patch_size=16,
  num_labels=10,
)


def random_hf_model(kind: str, seed: int = 0) -> torch.nn.Module:
  """A transformers ViT or DeiT-with-teacher of DeiT-Ti's shape, every weight perturbed."""
  torch.manual_seed(seed)
  if kind == 'vit':
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**HF_TINY))
  else:
    model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**HF_TINY))
  return perturbed(model)


def hf_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    pixels = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)
    return model(pixel_values=pixels).logits.numpy()


def to_npz(state_dict, scheme: str, prefix: str) -> dict[str, np.ndarray]:
  """A timm ViT state dict in Google's JAX naming: per-head attention kernels, HWIO patch kernel.

  'vision_transformer': `encoderblock_{i}` with MultiHeadDotProductAttention_1 / MlpBlock_3 /
  LayerNorm_0,2 and the position embedding with its cls slot; 'big_vision': blocks stacked in
  `encoderblock`, MultiHeadDotProductAttention_0 / MlpBlock_0 / LayerNorm_0,1, `pos_embedding`
  without the cls slot.
  """
  sd = {k: v.detach().numpy() for k, v in state_dict.items()}
  dim = sd['cls_token'].shape[-1]
  heads = registry.get_spec(NPZ_NAME).num_heads
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
  w = to_npz(random_timm_model(NPZ_NAME, seed=seed).state_dict(), scheme, prefix)
  w = {k: v for k, v in w.items() if k.removeprefix(prefix) not in drop} | (add or {})
  path = tmp_path / f'{scheme}.npz'
  np.savez(path, **w)
  return path
