"""Flax NNX ViT/DeiT whose module and parameter names mirror timm's `VisionTransformer`.

Every parameter path maps one-to-one onto a timm state-dict key (`blocks.3.attn.qkv.kernel` <->
`blocks.3.attn.qkv.weight`), so checkpoint conversion is a key table plus transposes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ats_jax import flops
from ats_jax.models import ats, compact
from ats_jax.models.registry import ViTSpec
from ats_jax.ops import attention as attention_ops

LAYER_NORM_EPS = 1e-6  # timm's ViT LayerNorm, not PyTorch's 1e-5 default.


def _linear(din: int, dout: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """A Linear with timm's ViT init (trunc-normal 0.02, zero bias) and float32 parameters."""
  return nnx.Linear(
    din,
    dout,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nnx.initializers.truncated_normal(0.02),
    rngs=rngs,
  )


def _layer_norm(dim: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class PatchEmbed(nnx.Module):
  """Non-overlapping patches through a strided conv, as timm's `patch_embed.proj`."""

  def __init__(self, patch_size: int, embed_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.proj = nnx.Conv(
      3,
      embed_dim,
      kernel_size=(patch_size, patch_size),
      strides=(patch_size, patch_size),
      padding='VALID',
      dtype=dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
    )

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.proj(images)  # [B, H/p, W/p, C]
    return x.reshape(x.shape[0], -1, x.shape[-1])  # [B, L, C], row-major as timm's flatten(2)


class Attention(nnx.Module):
  """Multi-head self-attention; honours an optional token mask (see `ats_jax.ops.attention`)."""

  def __init__(self, dim: int, num_heads: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
    self.num_heads = num_heads
    self.qkv = _linear(dim, 3 * dim, dtype, rngs)
    self.proj = _linear(dim, dim, dtype, rngs)

  def qkv_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projects tokens to per-head queries, keys and values, each [B, N, H, d]."""
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    q, k, v = self.qkv_heads(x)  # [B, N, H, d]
    weights = attention_ops.attention_weights(q, k, mask)  # [B, H, N, N], float32
    out = attention_ops.attend(weights, v)  # [B, N, C]
    return self.proj(out)


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden_dim, dtype, rngs)
    self.fc2 = _linear(hidden_dim, dim, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # exact GELU, as torch's nn.GELU


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  With `sampling` set it is an ATS block (`ats_jax.models.ats`): same parameters, fewer tokens out.
  """

  def __init__(
    self,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    *,
    sampling: ats.Sampling | None = None,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    self.sampling = sampling
    self.norm1 = _layer_norm(dim, dtype, rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, dtype, rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

  def __call__(
    self, x: jax.Array, mask: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array | None]:
    """x [B, N, C] and its token mask [B, N] (None: every token real) -> the same, updated."""
    if self.sampling is not None:
      return ats.ats_block(self, x, mask, self.sampling)
    x = attention_ops.apply_mask(x + self.attn(self.norm1(x), mask), mask)
    x = attention_ops.apply_mask(x + self.mlp(self.norm2(x)), mask)
    return x, mask


class VisionTransformer(nnx.Module):
  """ViT/DeiT classifier. Distilled variants add `dist_token` and `head_dist`, averaged at eval.

  `ats_blocks`/`num_tokens` turn on ATS (`ats_jax.models.ats`); `bucket_size` > 0 runs the blocks
  after the first ATS block on the fewest tokens that hold the batch's (`ats_jax.models.compact`),
  0 on the full padded shapes. Both give the same predictions.
  """

  def __init__(
    self,
    *,
    img_size: int = 224,
    patch_size: int = 16,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_ratio: float = 4.0,
    num_classes: int = 1000,
    distilled: bool = False,
    ats_blocks: Sequence[int] = (),
    num_tokens: float | Sequence[float] = 197,
    bucket_size: int = 16,
    dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if img_size % patch_size:
      raise ValueError(f'img_size {img_size} is not a multiple of patch_size {patch_size}')
    self.img_size = img_size
    self.num_prefix_tokens = 2 if distilled else 1
    self.spec = ViTSpec(
      embed_dim, depth, num_heads, img_size, patch_size, mlp_ratio, num_classes, distilled
    )
    num_patches = (img_size // patch_size) ** 2
    plan = ats.sampling_plan(
      depth, num_patches + self.num_prefix_tokens, self.num_prefix_tokens, ats_blocks, num_tokens
    )
    if bucket_size < 0:
      raise ValueError(f'bucket_size must be >= 0 (0: padded execution), got {bucket_size}')
    self.bucket_size = bucket_size
    self.dtype = dtype
    self.patch_embed = PatchEmbed(patch_size, embed_dim, dtype=dtype, rngs=rngs)
    tok_init = nnx.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(tok_init(rngs.params(), (1, 1, embed_dim)))
    self.dist_token = nnx.Param(tok_init(rngs.params(), (1, 1, embed_dim))) if distilled else None
    self.pos_embed = nnx.Param(
      tok_init(rngs.params(), (1, num_patches + self.num_prefix_tokens, embed_dim))
    )
    self.blocks = nnx.List(
      [Block(embed_dim, num_heads, mlp_ratio, sampling=s, dtype=dtype, rngs=rngs) for s in plan]
    )
    self.norm = _layer_norm(embed_dim, dtype, rngs)
    self.head = _linear(embed_dim, num_classes, dtype, rngs)
    self.head_dist = _linear(embed_dim, num_classes, dtype, rngs) if distilled else None

  def embed(self, images: jax.Array) -> jax.Array:
    """Patch tokens with cls (and dist) prepended, plus position embedding: [B, N0, C]."""
    if images.ndim != 4 or images.shape[1:] != (self.img_size, self.img_size, 3):
      raise ValueError(
        f'expected images of shape [B, {self.img_size}, {self.img_size}, 3] (NHWC), '
        f'got {tuple(images.shape)}'
      )
    x = self.patch_embed(images)
    b = x.shape[0]
    prefix = [self.cls_token[...]] + ([self.dist_token[...]] if self.dist_token is not None else [])
    prefix = [jnp.broadcast_to(t, (b, 1, t.shape[-1])).astype(x.dtype) for t in prefix]
    return jnp.concatenate([*prefix, x], axis=1) + self.pos_embed[...].astype(x.dtype)

  def head_logits(self, x: jax.Array) -> jax.Array:
    """Final norm then the head(s) on the prefix tokens; float32 logits."""
    x = self.norm(x)
    logits = self.head(x[:, 0])
    if self.head_dist is not None:
      logits = (logits + self.head_dist(x[:, 1])) / 2
    return logits.astype(jnp.float32)

  def __call__(
    self, images: jax.Array, return_stats: bool = False
  ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [B, classes] for NHWC images; with `return_stats` also the tokens each image kept.

    stats['kept_tokens'] [B, depth] int: real tokens entering each block's MLP (prefix included).
    stats['gflops'] [B]: the image's cost at the tokens it kept (`ats_jax.flops`).
    """
    x = self.embed(images.astype(self.dtype))  # [B, N0, C]
    mask = None
    kept = []
    for block in self.blocks:  # ATS blocks shrink x to their cap; `mask` marks the real tokens
      if mask is None or not self.bucket_size:
        x, mask = block(x, mask)
      else:  # after the first ATS block: run on the fewest slots that hold the batch's tokens
        out = x.shape[1] if block.sampling is None else block.sampling.cap
        x, mask = compact.run_compacted(block, x, mask, self.bucket_size, out)
      kept.append(jnp.full(x.shape[0], x.shape[1]) if mask is None else mask.sum(-1))
    logits = self.head_logits(x)
    if not return_stats:
      return logits
    kept_tokens = jnp.stack(kept, axis=1).astype(jnp.int32)  # [B, depth]
    entering = jnp.concatenate(
      [jnp.full_like(kept_tokens[:, :1], self.pos_embed.shape[1]), kept_tokens[:, :-1]], axis=1
    )
    return logits, {
      'kept_tokens': kept_tokens,
      'gflops': flops.gflops(self.spec, entering, kept_tokens),
    }


def abstract_model(**kwargs) -> VisionTransformer:
  """A `VisionTransformer` with shape-only parameters: no memory or init cost; ready for loading."""
  return nnx.eval_shape(lambda: VisionTransformer(**kwargs, rngs=nnx.Rngs(0)))


def param_dict(model: nnx.Module) -> dict[str, nnx.Param]:
  """Parameters by dotted path (`blocks.0.attn.qkv.kernel`): the names mapped to timm's keys."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {'.'.join(map(str, path)): param for path, param in flat}
