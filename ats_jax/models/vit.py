"""Flax NNX ViT/DeiT whose module and parameter names mirror timm's `VisionTransformer`.

Every parameter path maps one-to-one onto a timm state-dict key (`blocks.3.attn.qkv.kernel` <->
`blocks.3.attn.qkv.weight`), so checkpoint conversion is a key table plus transposes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ats_jax import layout
from ats_jax.layout import PADDED, Execution, Slots, parallel, slot_map, token_map
from ats_jax.models import ats, flops
from ats_jax.models.registry import ViTSpec
from ats_jax.ops import attention as attention_ops
from ats_jax.ops import token_sampling

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
  """Multi-head self-attention's parameters (timm's `attn.qkv`, `attn.proj`).

  The block runs it in pieces: `qkv` and `proj` are per-token work (`ats_jax.layout.streams`), the
  weights between them per image (`ats_jax.ops.attention`).
  """

  def __init__(self, dim: int, num_heads: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
    self.num_heads = num_heads
    self.qkv = _linear(dim, 3 * dim, dtype, rngs)
    self.proj = _linear(dim, dim, dtype, rngs)

  def heads(self, x: jax.Array) -> jax.Array:
    """q, k or v [B, N, C] -> [B, H, N, d]: heads before tokens, as XLA's products want."""
    b, n, c = x.shape
    return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(0, 2, 1, 3)


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden_dim, dtype, rngs)
    self.fc2 = _linear(hidden_dim, dim, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # exact GELU, as torch's nn.GELU


def split_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """qkv [..., 3C] -> q, k, v [..., C]: timm's order. Slicing where each is read (inside
  attention's own gathers and fusions) copies nothing."""
  c = qkv.shape[-1] // 3
  return qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]


def _qkv(modules, x: jax.Array, *cls_query: jax.Array) -> tuple[jax.Array, ...]:
  """Per-token: qkv(norm1(x)) [..., 3C], one array that attention slices only where it reads it.
  Three [..., C] outputs were each copied out of the product and written on their own
  (`docs/execution.md`). x [..., C]. With the token's
  image's cls query [..., H, d] (an ATS block), also what sampling needs of each token, while k and
  v are in cache: its logit against the query [..., H] and ||v|| [...]."""
  norm1, qkv = modules
  y = qkv(norm1(x))
  if not cls_query:
    return (y,)
  _, k, v = split_qkv(y)
  return y, attention_ops.cls_logits(cls_query[0], k), token_sampling.value_norms(v)


def _residuals(modules, out: jax.Array, x: jax.Array, *drop: jax.Array) -> tuple[jax.Array]:
  """Per-token: the attention residual, then the MLP's. `drop` [..., 2]: stochastic depth scales."""
  proj, norm2, mlp = modules
  att = proj(out)
  if drop:
    att = att * drop[0][..., :1].astype(att.dtype)
  x = x + att
  y = mlp(norm2(x))
  if drop:
    y = y * drop[0][..., 1:].astype(y.dtype)
  return (x + y,)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  With `sampling` set it is an ATS block (`ats_jax.models.ats`): same parameters, fewer tokens out.
  Per-token work and attention run on the model's token layout (`ats_jax.layout`).
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
    self,
    x: jax.Array,
    mask: jax.Array | None = None,
    *,
    execution: Execution = PADDED,
    budgets: tuple[int | None, int | None] = (None, None),
    drop: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """x [B, N, C] and its token mask [B, N] (None: every token real) -> x [B, K, C], its mask
    [B, K], and the input slot of each output slot [B, K] (None: the block keeps every slot).

    An ATS block scores its tokens with the cls row of attention, then attends the rows it keeps
    alone. `budgets`: the stream rows of the tokens coming in and of those kept (budgeted
    execution). `drop` [B, 2]: the per-image scales of the attention and MLP residuals
    (stochastic depth), None at eval.
    """
    # qkv [B, N, 3C] is zero at padded tokens (`token_map`), as the spec's ATS blocks zero them
    modules = (self.norm1, self.attn.qkv)
    per_image = () if self.sampling is None else (self._cls_query(x),)
    qkv, *scoring = token_map(_qkv, modules, x, mask=mask, execution=execution,
                              budget=budgets[0], per_image=per_image)  # fmt: skip
    rows, kept = None, mask
    if self.sampling is not None:  # scored with the cls row alone, before any other attention
      rows, kept = ats.sample(*scoring, mask, self.sampling, execution.search)  # [B, K]
      x = jnp.take_along_axis(x, rows[:, :, None], axis=1, mode='promise_in_bounds')  # [B, K, C]
    slots = Slots((qkv,), mask, () if rows is None else (rows,), kept)
    (out,) = slot_map(self._attend, slots, execution)
    extra = () if drop is None else (jnp.broadcast_to(drop[:, None], (*x.shape[:2], 2)),)
    modules = (self.attn.proj, self.norm2, self.mlp)
    (x,) = token_map(_residuals, modules, out, x, *extra, mask=kept, execution=execution,
                     budget=budgets[1])  # fmt: skip
    return x, kept, rows

  def _cls_query(self, x: jax.Array) -> jax.Array:
    """The cls token's query, scaled by 1 / sqrt(d): x [B, N, C] -> [B, H, d] (what `_qkv` takes
    each token's sampling logit against)."""
    q = split_qkv(_qkv((self.norm1, self.attn.qkv), x[:, 0])[0])[0]  # [B, C]
    b, c = q.shape
    d = c // self.attn.num_heads
    return q.reshape(b, self.attn.num_heads, d) * jnp.asarray(d**-0.5, q.dtype)

  def _attend(self, slots: Slots) -> tuple[jax.Array]:
    """The block's attention, per image: keys (qkv [B, N, 3C]) and their mask; queries: () (every
    slot asks) or the rows ATS kept [B, K] -> the attention output [B, Q, C] before `proj`. Slots
    with no pick get a finite row that nothing reads: the residual section zeroes them (padded) or
    skips them (streams), as the spec zeroes them."""
    (qkv,), key_mask = slots.keys, slots.key_mask
    if self.sampling is not None:  # ATS blocks always mask (the spec), even with nothing padded
      key_mask = jnp.ones(qkv.shape[:2]) if key_mask is None else key_mask
    q, k, v = split_qkv(qkv)
    if slots.queries:  # the kept rows alone: [B, K, C]
      q = jnp.take_along_axis(q, slots.queries[0][:, :, None], axis=1, mode='promise_in_bounds')
    q, k, v = (self.attn.heads(t) for t in (q, k, v))  # [B, H, N, d]
    return (attention_ops.fused_attention(q, k, v, key_mask),)  # [B, Q, C]


class VisionTransformer(nnx.Module):
  """ViT/DeiT classifier. Distilled variants add `dist_token` and `head_dist`, averaged at eval.

  `ats_blocks`/`num_tokens` turn on ATS (`ats_jax.models.ats`). `execution` says how blocks run
  once ATS has masked tokens (`ats_jax.layout.Execution`: 'padded', 'packed', 'budgeted', or
  'auto', this backend's choice); `pack_chunks`, `attention_sizes` and `budgets` override its
  fields. All give the same predictions. `drop_path_rate`: stochastic depth (timm's linear rule
  over the blocks), active only when the forward gets an `rng`.
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
    execution: str | Execution = 'auto',
    pack_chunks: int | None = None,
    attention_sizes: int | None = None,
    budgets: Sequence[int | None] | None = None,
    drop_path_rate: float = 0.0,
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
    self.execution = layout.resolve(
      execution, pack_chunks=pack_chunks, attention_sizes=attention_sizes, budgets=budgets
    )
    if not 0 <= drop_path_rate < 1:
      raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate}')
    self.drop_path_rate = drop_path_rate
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
    """Patch tokens with cls (and dist) prepended, plus position embedding: [B, N0, C] float32."""
    if images.ndim != 4 or images.shape[1:] != (self.img_size, self.img_size, 3):
      raise ValueError(
        f'expected images of shape [B, {self.img_size}, {self.img_size}, 3] (NHWC), '
        f'got {tuple(images.shape)}'
      )
    x = self.patch_embed(images).astype(jnp.float32)  # the residual stream is float32
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

  def drop_scales(self, rng: jax.Array, batch: int) -> list[jax.Array | None]:
    """Per block, the per-image scales [B, 2] of its two residuals: 0 (dropped) or 1 / keep."""
    depth = len(self.blocks)
    scales = []
    for i in range(depth):
      rate = self.drop_path_rate * i / max(depth - 1, 1)  # timm: linspace(0, rate, depth)
      if rate == 0:
        scales.append(None)
        continue
      keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate, (batch, 2))
      scales.append(keep.astype(jnp.float32) / (1.0 - rate))
    return scales

  def __call__(
    self, images: jax.Array, return_stats: bool = False, *, rng: jax.Array | None = None
  ) -> jax.Array | tuple[jax.Array, dict]:
    """Logits [B, classes] for NHWC images; with `return_stats` also what the blocks did.

    stats['kept_tokens'] [B, depth] int: real tokens entering each block's MLP (prefix included).
    stats['gflops'] [B]: the image's cost at the tokens it kept (`ats_jax.models.flops`).
    stats['kept_ids']: per ATS block, the original token index of each output slot [B, K] (-1 for
    padding; minus num_prefix_tokens it is the patch, row-major).
    stats['stream_tokens'] [depth] int: per block, the most real tokens one device's share of the
    batch kept: what a budget must hold (`ats_jax.layout.budgets`).
    stats['overflow'] bool: some block kept more tokens than its budget (budgeted execution): the
    logits are not the model's and the batch must be re-run.
    `rng` (training): drops residual branches per image with `drop_path_rate`.
    """
    # The residual stream stays float32 (as under torch.autocast): only the layers compute in dtype
    x = self.embed(images.astype(self.dtype))  # [B, N0, C] float32
    b = x.shape[0]
    drops = [None] * len(self.blocks)
    if rng is not None and self.drop_path_rate > 0:
      drops = self.drop_scales(rng, b)
    execution = self.execution
    mask = None
    ids = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])  # [B, N0]: each slot's token
    kept, kept_ids = [], []
    for i, (block, drop) in enumerate(zip(self.blocks, drops, strict=True)):
      budgets = (execution.budget(i - 1) if i else None, execution.budget(i))
      x, mask, rows = block(x, mask, execution=execution, budgets=budgets, drop=drop)
      kept.append(jnp.full(b, x.shape[1]) if mask is None else mask.sum(-1))
      if rows is not None:
        ids = jnp.where(mask > 0, jnp.take_along_axis(ids, rows, axis=1), -1)  # [B, K]
        kept_ids.append(ids)
    logits = self.head_logits(x)
    if not return_stats:
      return logits
    kept_tokens = jnp.stack(kept, axis=1).astype(jnp.int32)  # [B, depth]
    entering = jnp.concatenate(
      [jnp.full_like(kept_tokens[:, :1], self.pos_embed.shape[1]), kept_tokens[:, :-1]], axis=1
    )
    streams = stream_tokens(kept_tokens, execution.axis_name)  # [depth]
    return logits, {
      'kept_tokens': kept_tokens,
      'gflops': flops.gflops(self.spec, entering, kept_tokens),
      'kept_ids': kept_ids,
      'stream_tokens': streams,
      'overflow': overflowed(streams, execution.budgets),
    }


def stream_tokens(kept_tokens: jax.Array, axis_name: str) -> jax.Array:
  """kept_tokens [B, depth] -> [depth]: per block, the most real tokens any device's share of the
  batch holds (the images split over the set mesh's `axis_name`, as `shard_map` splits them)."""
  shards = parallel.num_shards(axis_name)
  per_device = kept_tokens.reshape(shards, -1, kept_tokens.shape[-1]).sum(axis=1)
  return per_device.max(axis=0)


def overflowed(streams: jax.Array, budgets: Sequence[int | None]) -> jax.Array:
  """Whether some block's stream [depth] holds more real tokens than its budget (None: none)."""
  limits = [b for b in budgets if b is not None]
  if not limits:
    return jnp.zeros((), bool)
  over = [streams[i] > b for i, b in enumerate(budgets) if b is not None]
  return jnp.any(jnp.stack(over))


def abstract_model(**kwargs) -> VisionTransformer:
  """A `VisionTransformer` with shape-only parameters: no memory or init cost; ready for loading."""
  return nnx.eval_shape(lambda: VisionTransformer(**kwargs, rngs=nnx.Rngs(0)))


def param_dict(model: nnx.Module) -> dict[str, nnx.Param]:
  """Parameters by dotted path (`blocks.0.attn.qkv.kernel`): the names mapped to timm's keys."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {'.'.join(map(str, path)): param for path, param in flat}


def with_execution(graphdef: nnx.GraphDef, state: nnx.State, execution: Execution) -> nnx.GraphDef:
  """`graphdef` with another execution (budgets): the same parameters, another static program."""
  model = nnx.merge(graphdef, state)
  model.execution = execution
  return nnx.split(model)[0]
