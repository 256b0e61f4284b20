"""Per-token work on a token layout: dense, padded, or packed into one stream of real tokens.

Everything in a transformer block except attention (norm1, qkv, proj, norm2, the MLP: about 90% of
its FLOPs at 197 tokens) treats each token on its own. `token_map` is the one place that decides
where that work runs, given a token mask [B, N] (real tokens first in each image's slots):

- no mask (before the first ATS block): on every slot;
- padded (`num_sizes=0`): on every slot, padded slots zeroed after;
- packed (`num_sizes>0`): on one flat stream [S, C] of the batch's real tokens, image after image,
  S being the batch's total rounded up to a ladder of `num_sizes` sizes (geometric, from B*N / 4
  to B*N). One `lax.switch` per call picks the size inside the compiled program, so the cost
  follows the batch's *mean* kept tokens, not its fullest image's. Packing and unpacking are
  gathers whose indices come from the mask by cumulative sums: shapes stay static under `jit`.

Attention, whose cost is per image, runs padded (`slot_map`): on the fewest leading slots that hold
the fullest image of each group of 8 images with similar token counts, from a ladder of its own.

Under `grad`, a custom VJP keeps only the inputs and recomputes the branch taken in the backward
pass (the backward of a `lax.switch` would otherwise keep every branch's residuals, zero-filled).
With a mesh set (`jax.set_mesh`) whose data axis splits the batch, each device packs its own
images (`shard_map`), so no token crosses devices. Padded and packed execution apply the same
per-token function to the same real tokens, so they give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ats_jax.sharding import DATA_AXIS

MIN_FRACTION = 0.25  # the smallest stream: a quarter of the slots
ATTENTION_GROUP = 8  # images sized together for attention (`_grouped`)
TokenFn = Callable[
  ..., tuple[jax.Array, ...]
]  # (modules, *tokens [..., C_in]) -> tokens [..., C_out]


def ladder(total: int, num_sizes: int) -> tuple[int, ...]:
  """Stream sizes for `total` slots: `num_sizes` sizes in geometric steps from total / 4 to total.

  Geometric steps waste the same share of work at every count (rounding up costs at most the
  step ratio, 4 ** (1 / (num_sizes - 1)): 22% for 8 sizes, half that on average); ATS rarely keeps
  under a quarter of the tokens in a whole batch.
  """
  if num_sizes == 1:
    return (total,)
  ratio = (1 / MIN_FRACTION) ** (1 / (num_sizes - 1))
  return tuple(sorted({max(1, math.ceil(total / ratio**i)) for i in range(num_sizes)}))


def size_index(sizes: Sequence[int], mask: jax.Array) -> jax.Array:
  """Index of the smallest size that holds every real token of mask [B, N]."""
  return jnp.searchsorted(jnp.asarray(sizes), jnp.sum(mask), side='left')


def pack_indices(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """Where each stream slot reads and each image slot writes back.

  mask [B, N] bool, real tokens first -> gather [S] (flat B*N slot of each stream slot) and scatter
  [B, N] (stream slot of each image slot). Stream slots past the batch's total read the first
  image's cls token (real, so finite); nothing reads them back, so under `grad` their cotangents
  are zero.
  """
  b, n = mask.shape
  counts = jnp.sum(mask, axis=-1)  # [B]
  ends = jnp.cumsum(counts)
  starts = ends - counts
  slot = jnp.arange(size)
  image = jnp.minimum(jnp.searchsorted(ends, slot, side='right'), b - 1)  # [S]
  gather = jnp.where(slot < ends[-1], image * n + jnp.clip(slot - starts[image], 0, n - 1), 0)
  scatter = jnp.minimum(starts[:, None] + jnp.arange(n), size - 1)  # [B, N]
  return gather, scatter


def _zero_padded(y: jax.Array, mask: jax.Array) -> jax.Array:
  """y [B, N, ...] with padded slots 0, whatever they held (`where`: even inf or NaN)."""
  return jnp.where(mask.reshape(*mask.shape, *(1,) * (y.ndim - 2)) > 0, y, 0)


def switch_remat(index: jax.Array, branch: Callable[[int], Callable], sizes: Sequence[int], *ops):
  """`lax.switch(index, [branch(s) for s in sizes], *ops)` whose backward recomputes the branch
  taken: the only residuals are `ops`, where a plain switch under `grad` keeps every branch's
  residuals (zero-filled for the branches not taken)."""
  if len(sizes) == 1:
    return branch(sizes[0])(*ops)

  def backward(size: int):
    def run(ops, cts):
      return jax.vjp(branch(size), *ops)[1](cts)

    return run

  @jax.custom_vjp
  def apply(index, ops):
    return jax.lax.switch(index, [branch(s) for s in sizes], *ops)

  def apply_fwd(index, ops):
    return apply(index, ops), (index, ops)

  def apply_bwd(residuals, cts):
    index, ops = residuals
    return None, jax.lax.switch(index, [backward(s) for s in sizes], ops, cts)

  apply.defvjp(apply_fwd, apply_bwd)
  return apply(index, ops)


def _packed(fn: Callable, params, xs: tuple[jax.Array, ...], mask: jax.Array, num_sizes: int):
  """`fn(params, *tokens)` on the real tokens of xs [B, N, ...] packed into one stream."""
  b, n = mask.shape
  sizes = ladder(b * n, num_sizes)

  def branch(size: int):
    def run(params, xs, mask):
      gather, scatter = pack_indices(mask, size)
      ys = fn(params, *(x.reshape(-1, *x.shape[2:])[gather] for x in xs))  # [S, ...]
      return tuple(_zero_padded(y[scatter], mask) for y in ys)  # [B, N, ...]

    return run

  return switch_remat(size_index(sizes, mask), branch, sizes, params, xs, mask)


def _compacted(fn: Callable, xs: tuple[jax.Array, ...], mask: jax.Array, out_size: int,
              num_sizes: int):  # fmt: skip
  """`fn(*xs, mask)` on the first n slots only, n the smallest of a ladder of `num_sizes` sizes that
  holds the batch's fullest image: for attention, whose cost is per image.

  xs [B, N, ...], mask [B, N] -> fn's outputs [B, <= n, ...] padded with zeros to `out_size`.
  """
  sizes = ladder(mask.shape[1], num_sizes)

  def branch(size: int):
    def run(xs, mask):
      ys = fn(*(x[:, :size] for x in xs), mask[:, :size])
      return tuple(jnp.pad(y, [(0, 0), (0, out_size - y.shape[1])] + [(0, 0)] * (y.ndim - 2))
                   for y in ys)  # fmt: skip

    return run

  needed = jnp.max(jnp.sum(mask > 0, axis=-1))
  index = jnp.searchsorted(jnp.asarray(sizes), needed, side='left')
  return switch_remat(index, branch, sizes, xs, mask)


def _grouped(fn: Callable, xs: tuple[jax.Array, ...], mask: jax.Array, out_size: int,
             num_sizes: int):  # fmt: skip
  """`_compacted` per group of `ATTENTION_GROUP` images of similar token counts.

  In a large batch the fullest image is near the cap, so one size for the whole batch would run
  every image's attention at full length. Images are sorted by their token count, split into groups
  and a `lax.scan` over the groups (one compiled body, whatever the batch) sizes each group for its
  own fullest image; results go back in the batch's order. Attention is per image, so grouping
  changes no number.
  """
  b = mask.shape[0]
  if b <= ATTENTION_GROUP or b % ATTENTION_GROUP:
    return _compacted(fn, xs, mask, out_size, num_sizes)
  order = jnp.argsort(jnp.sum(mask > 0, axis=-1))  # [B] fewest tokens first
  grouped = [x[order].reshape(-1, ATTENTION_GROUP, *x.shape[1:]) for x in (*xs, mask)]

  def group(carry, chunk):
    return carry, _compacted(fn, tuple(chunk[:-1]), chunk[-1], out_size, num_sizes)

  _, ys = jax.lax.scan(group, None, grouped)
  back = jnp.argsort(order)  # [B] the inverse permutation
  return tuple(y.reshape(b, *y.shape[2:])[back] for y in ys)


def _data_parallel(run: Callable, replicated: int) -> Callable:
  """`run` per device over the mesh's data axis when a mesh with one is set (`jax.set_mesh`); its
  first `replicated` arguments (parameters) whole on every device, the rest split by image."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names or mesh.shape[DATA_AXIS] == 1:
    return run

  def specs(*args):
    split = (P(),) * replicated + (P(DATA_AXIS),) * (len(args) - replicated)
    return jax.shard_map(run, in_specs=split, out_specs=P(DATA_AXIS), check_vma=False)(*args)

  return specs


def token_map(
  fn: TokenFn, modules, *xs: jax.Array, mask: jax.Array | None, num_sizes: int
) -> tuple[jax.Array, ...]:
  """`fn(modules, *xs)` on every token of xs [B, N, ...]: see the module docstring for where.

  `modules` are the nnx modules `fn` uses (their parameters get gradients); mask [B, N] or None.
  """
  if mask is None:
    return fn(modules, *xs)
  if not num_sizes:
    return tuple(_zero_padded(y, mask) for y in fn(modules, *xs))
  graphdef, params = nnx.split(modules)

  def pure(params, *tokens):
    return fn(nnx.merge(graphdef, params), *tokens)

  run = _data_parallel(lambda p, xs, m: _packed(pure, p, xs, m, num_sizes), replicated=1)
  return run(params, tuple(xs), mask > 0)


def slot_map(
  fn: Callable, *xs: jax.Array, mask: jax.Array | None, out_size: int, num_sizes: int
) -> tuple[jax.Array, ...]:
  """`fn(*xs, mask)` -> outputs [B, out_size, ...], on the fewest leading slots that hold each
  group's fullest image (a ladder of `num_sizes` sizes, `_grouped`), or on all when 0."""
  if mask is None or not num_sizes:
    return fn(*xs, mask)
  run = _data_parallel(lambda xs, m: _grouped(fn, xs, m, out_size, num_sizes), replicated=0)
  return run(tuple(xs), mask)
