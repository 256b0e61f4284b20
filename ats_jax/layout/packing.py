"""Per-token work on a token layout: dense, padded, or packed into one stream of real tokens.

Everything in a transformer block except attention (norm1, qkv, proj, norm2, the MLP: about 90% of
its FLOPs at 197 tokens) treats each token on its own. `token_map` is the one place that decides
where that work runs, given a token mask [B, N] (real tokens first in each image's slots):

- no mask (before the first ATS block): on every slot;
- padded (`num_chunks=0`): on every slot, padded slots zeroed after;
- packed (`num_chunks>0`): on one flat stream of the batch's real tokens, image after image: a
  loop over chunks of B*N / `num_chunks` rows (at least `MIN_CHUNK`: small products run far below
  a core's peak) that stops after the last whole chunk, then the rest in pieces of 16, 32, 64, ...
  rows (its binary digits, one `lax.cond` each). The cost follows the batch's *mean* kept tokens,
  to within 16 rows, and each body is compiled once, whatever the batch keeps. Each piece gathers
  its rows and scatters its results back by indices computed from the mask by cumulative sums:
  shapes stay static under `jit`. A stream of one chunk at most (batch 1) that is more than
  `FULL_FRACTION` real runs padded instead, under a `lax.cond`: pieces of a nearly full slot
  count cost more than the slots they skip.

Attention, whose cost is per image, runs padded (`slot_map`): in groups of `ATTENTION_GROUP` images
of similar token counts, each on the fewest leading slots that hold its fullest image's tokens,
from a ladder of sizes: one loop per size over the groups of that size.

Under `grad`, custom VJPs keep only the inputs and recompute in the backward pass: the packed stream
chunk by chunk and attention group by group (a loop with a data-dependent length has no automatic
reverse mode), a small batch's attention the branch taken (the backward of a `lax.switch` would
otherwise keep every branch's residuals, zero-filled). With a mesh set (`jax.set_mesh`) whose data
axis splits the batch, each device packs its own images (`shard_map`), so no token crosses devices.
Padded and packed execution apply the same per-token function to the same real tokens, so they
give the same numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from ats_jax.ops import token_sampling
from ats_jax.training.sharding import DATA_AXIS

MIN_CHUNK = 256  # rows a loop step at least: small products run far below a core's peak
ALIGN = 16  # rows: the stream runs to its total rounded up to a multiple of this
# one-chunk streams fuller than this run padded. DeiT-S ATS at batch 1 with plain random weights
# (177 of 197 tokens kept): 57.6-58.2 ms against 60.1 packed, dense 54.6 (thresholds 0.6 and 0.8
# alike, 0.9 60.3); with q, k x4 (70 kept) 29.2 against 28.9 ms
FULL_FRACTION = 0.75
MIN_FRACTION = 0.125  # attention's smallest size: an eighth of the slots,
MIN_SLOTS = 8  # but never fewer than ATS keeps at least (`ats.MIN_TOKENS`)
# images sized together for attention (`_grouped`). DeiT-S ATS at batch 32 (one process, alternated)
# with 1, 2, 4 and 8: 750, 750, 758 and 772 ms on photos with sharp attention (q, k x4: 74 tokens
# kept); 0.96x, 0.98x and 0.995x dense (1, 2, 4) with plain random weights (183 kept: loop steps,
# not sizes, count)
ATTENTION_GROUP = 4
TokenFn = Callable[
  ..., tuple[jax.Array, ...]
]  # (modules, *tokens [..., C_in]) -> tokens [..., C_out]


def chunk_rows(total: int, num_chunks: int) -> int:
  """Rows per loop step of a packed stream of `total` slots: total / num_chunks, at least
  `MIN_CHUNK`, at most `total`, rounded up to a multiple of `ALIGN`."""
  rows = max(MIN_CHUNK, -(-total // num_chunks))
  return min(-(-total // ALIGN), -(-rows // ALIGN)) * ALIGN


def ladder(total: int, num_sizes: int) -> tuple[int, ...]:
  """Slot counts for attention: `num_sizes` sizes in geometric steps from total * MIN_FRACTION to
  total.

  Geometric steps waste the same share of work at every count (rounding up costs at most the step
  ratio, (1 / MIN_FRACTION) ** (1 / (num_sizes - 1)), half of it on average). No size is under
  `MIN_SLOTS` (or `total`).
  """
  if num_sizes == 1:
    return (total,)
  ratio = (1 / MIN_FRACTION) ** (1 / (num_sizes - 1))
  floor = min(total, MIN_SLOTS)
  return tuple(sorted({max(floor, math.ceil(total / ratio**i)) for i in range(num_sizes)}))


def stream_indices(mask: jax.Array, length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Where each row of a packed stream of `length` rows reads and writes, and how many are real.

  mask [B, N] bool, real tokens first -> source [L] (the flat B*N slot each stream row reads: image
  after image), dest [L] (the slot it writes: its source, or B*N, out of bounds, for the rows past
  the batch's total) and that total. Rows past the total read the first image's cls token (real,
  so finite); what they write is never read.
  """
  b, n = mask.shape
  counts = jnp.sum(mask, axis=-1)  # [B]
  ends = jnp.cumsum(counts)
  starts = ends - counts
  row = jnp.arange(length)
  image = jnp.searchsorted(ends, row, side='right', method=token_sampling.search_method())
  image = jnp.minimum(image, b - 1)  # [L]
  real = row < ends[-1]
  slot = image * n + jnp.clip(row - starts[image], 0, n - 1)
  return jnp.where(real, slot, 0), jnp.where(real, slot, b * n), ends[-1]


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


def _stream_pieces(
  total: jax.Array, length: int, rows: int, body: Callable, carry, align: int | None = None
):
  """`carry = body(start, size, carry)` over the rows [0, total) of a stream of `length`, rounded up
  to `align`: whole chunks of `rows` in a loop (one compiled body, whatever the total), then what
  is left in at most one piece of each size in `tail_sizes(rows, align)`, its binary digits, each
  under a `lax.cond`. So the products stay large, and at most `align` - 1 rows past the total are
  computed. `align` None: `ALIGN`."""
  align = align or ALIGN
  aligned = (total + align - 1) // align * align
  if length == rows:  # one chunk at most: XLA hoists a loop's invariant body and always runs it
    carry = jax.lax.cond(aligned >= rows, functools.partial(body, 0, rows), lambda c: c, carry)
  else:
    carry = jax.lax.fori_loop(0, aligned // rows, lambda i, c: body(i * rows, rows, c), carry)
  start = aligned // rows * rows
  for size in reversed(tail_sizes(rows, align)):
    take = aligned - start >= size
    carry = jax.lax.cond(take, functools.partial(body, start, size), lambda c: c, carry)
    start = start + jnp.where(take, size, 0)
  return carry


def tail_sizes(rows: int, align: int | None = None) -> list[int]:
  """align, 2 align, 4 align, ... below `rows` (None: `ALIGN`): any multiple of `align` short of
  `rows` is a sum of distinct ones."""
  sizes = [align or ALIGN]
  while sizes[-1] * 2 < rows:
    sizes.append(sizes[-1] * 2)
  return [size for size in sizes if size < rows]


def _rows_of(indices: jax.Array, start: jax.Array, size: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(indices, start, size)


def _slots_per_image(flats, per_image) -> int:
  """N, from flats [B*N, ...] and per_image [B, ...] (1 without per_image: never used then)."""
  return flats[0].shape[0] // per_image[0].shape[0] if per_image else 1


def _inputs_of(flats, per_image, slots: jax.Array) -> list[jax.Array]:
  """The rows of flats [B*N, ...] at `slots`, then those of per_image [B, ...] at their images."""
  n = _slots_per_image(flats, per_image)
  return [f[slots] for f in flats] + [a[slots // n] for a in per_image]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stream_map(fn: Callable, rows: int, params, flats, per_image, source, dest, total):
  """`fn(params, *rows of flats, *their images' rows of per_image)` on the stream rows [0, total),
  in pieces (`_stream_pieces`): outputs [B*N, ...], zero in every slot no stream row writes (the
  padded slots). flats: the inputs [B*N, ...], per_image [B, ...]; rows past the total write out of
  bounds (dropped)."""
  probe = [jax.ShapeDtypeStruct((rows, *f.shape[1:]), f.dtype) for f in (*flats, *per_image)]
  shapes = jax.eval_shape(fn, params, *probe)
  outs = tuple(_fresh_zeros((flats[0].shape[0], *s.shape[1:]), s.dtype, total) for s in shapes)

  def piece(start, size, outs):
    src, dst = _rows_of(source, start, size), _rows_of(dest, start, size)
    ys = fn(params, *_inputs_of(flats, per_image, src))
    return tuple(_write(o, dst, y) for o, y in zip(outs, ys, strict=True))

  return _stream_pieces(total, source.shape[0], rows, piece, outs)


def _fresh_zeros(shape: Sequence[int], dtype: jnp.dtype, count: jax.Array) -> jax.Array:
  """Zeros computed from `count` (>= 0, of this call's data), so only once its data exists.

  Constant zeros would be one buffer that XLA shares between every block's loop and copies for
  each loop up front, all the copies alive at once: DeiT-S ATS at batch 32 needed 502 MiB of
  temporaries where it needs 114 (dense: 149), and a CPU faults in every page of them on each
  call (XLA allocates them per call).
  """
  return jnp.full(shape, count < 0, dtype)


def _write(out: jax.Array, dst: jax.Array, y: jax.Array, add: bool = False) -> jax.Array:
  """out[dst] = y (or += y), rows of out in increasing order; out-of-bounds rows dropped."""
  at = out.at[dst]
  return (at.add if add else at.set)(y, indices_are_sorted=True, mode='drop')


def _stream_map_fwd(fn, rows, params, flats, per_image, source, dest, total):
  residuals = (params, flats, per_image, source, dest, total)
  return _stream_map(fn, rows, params, flats, per_image, source, dest, total), residuals


def _stream_map_bwd(fn, rows, residuals, cts):
  """The stream in whole chunks, each recomputing its forward for its VJP: the residuals are the
  inputs alone (no activation is kept, as under `jax.checkpoint`). No tail: its conds would add a
  third to a training step's compile time (DeiT-S, batch 16: 27 to 35 s) for no measured gain."""
  params, flats, per_image, source, dest, total = residuals
  n = _slots_per_image(flats, per_image)

  def piece(start, size, carry):
    dparams, dflats, dimages = carry
    src, dst = _rows_of(source, start, size), _rows_of(dest, start, size)
    _, vjp = jax.vjp(fn, params, *_inputs_of(flats, per_image, src))
    # rows past the total read zero cotangents (out of bounds: filled), so give zero gradients
    dp, *dxs = vjp(tuple(ct.at[dst].get(mode='fill', fill_value=0) for ct in cts))
    dparams = jax.tree.map(jnp.add, dparams, dp)
    dflats = tuple(_write(d, dst, dx, add=True)
                   for d, dx in zip(dflats, dxs[: len(flats)], strict=True))  # fmt: skip
    dimages = tuple(_write(d, dst // n, dx, add=True)  # past the total: image B, dropped
                    for d, dx in zip(dimages, dxs[len(flats) :], strict=True))  # fmt: skip
    return dparams, dflats, dimages

  init = jax.tree.map(lambda x: _fresh_zeros(x.shape, x.dtype, total), (params, flats, per_image))
  dparams, dflats, dimages = _stream_pieces(total, source.shape[0], rows, piece, init, align=rows)
  return dparams, dflats, dimages, None, None, None


_stream_map.defvjp(_stream_map_fwd, _stream_map_bwd)


def _packed(fn: Callable, params, xs: tuple[jax.Array, ...], per_image: tuple[jax.Array, ...],
            mask: jax.Array, num_chunks: int):  # fmt: skip
  """`fn(params, *tokens, *their images' rows)` on the real tokens of xs [B, N, ...], packed,
  piece by piece."""
  b, n = mask.shape
  rows = chunk_rows(b * n, num_chunks)
  source, dest, total = stream_indices(mask, -(-b * n // rows) * rows)  # whole chunks (backward)
  flats = tuple(x.reshape(b * n, *x.shape[2:]) for x in xs)
  ys = _stream_map(fn, rows, params, flats, per_image, source, dest, total)
  return tuple(y.reshape(b, n, *y.shape[1:]) for y in ys)


def _counted(ops: dict) -> jax.Array:
  """The mask whose counts size attention: the keys' when masked (they hold at least the queries),
  else the queries'."""
  return ops['key_mask'] if 'key_mask' in ops else ops['query_mask']


def _cut(ops: dict, size: int, images: jax.Array | None = None) -> dict:
  """What `images` (indices [G] into the batch; None: all of it) need of ops on `size` leading
  slots: queries, masks and masked keys cut to the size, unmasked keys whole. Reading only those
  slots is what makes attention's cost follow the size."""
  return {k: tuple(_cut_one(ops, k, x, size, images) for x in v) if isinstance(v, tuple)
             else _cut_one(ops, k, v, size, images)
          for k, v in ops.items()}  # fmt: skip


def _rows(ops: dict, key: str, size: int) -> slice:
  """The slots of ops[key] that `_cut` reads: all of unmasked keys, else the first `size`."""
  return slice(None) if key == 'keys' and 'key_mask' not in ops else slice(size)


def _cut_one(ops: dict, key: str, x: jax.Array, size: int, images: jax.Array | None) -> jax.Array:
  rows = _rows(ops, key, size)
  return x[:, rows] if images is None else x[images, rows]


def _call(fn: Callable, cut: dict) -> tuple[jax.Array, ...]:
  return fn(**(dict(key_mask=None) | cut))


def _compacted(fn: Callable, ops: dict, num_sizes: int) -> tuple[jax.Array, ...]:
  """`fn` on the fewest leading slots (from a ladder of `num_sizes` sizes) that hold the batch's
  fullest image: for attention, whose cost is per image.

  ops: 'queries' (a tuple of [B, Nq, ...]) with 'query_mask' [B, Nq], and 'keys' (a tuple of
  [B, Nk, ...]) with 'key_mask' [B, Nk] when keys are masked (`_cut`). Returns fn's outputs
  [B, Nq, ...], padded with zeros after the size.
  """
  sizes = ladder(_counted(ops).shape[1], num_sizes)
  num_queries = ops['query_mask'].shape[1]

  def branch(size: int):
    def run(ops):
      return tuple(jnp.pad(y, [(0, 0), (0, num_queries - y.shape[1])] + [(0, 0)] * (y.ndim - 2))
                   for y in _call(fn, _cut(ops, size)))  # fmt: skip

    return run

  needed = jnp.max(jnp.sum(_counted(ops) > 0, axis=-1))
  index = jnp.searchsorted(jnp.asarray(sizes), needed, side='left', method='compare_all')
  return switch_remat(index, branch, sizes, ops)


def _groups_by_size(ops: dict, num_sizes: int) -> tuple[tuple[int, ...], jax.Array, jax.Array]:
  """Images in groups of `ATTENTION_GROUP` of similar token counts, and each group's size.

  -> the ladder, groups [B / G, G] (image indices, fewest tokens first) and bounds [sizes + 1]:
  the groups that run at sizes[i] are groups[bounds[i] : bounds[i + 1]] (sorted by count, the
  groups need nondecreasing sizes).
  """
  counts = jnp.sum(_counted(ops) > 0, axis=-1)
  sizes = ladder(_counted(ops).shape[1], num_sizes)
  groups = jnp.argsort(counts).reshape(-1, ATTENTION_GROUP)
  search = functools.partial(jnp.searchsorted, side='left', method='compare_all')
  index = search(jnp.asarray(sizes), jnp.max(counts[groups], axis=-1))  # [B / G] nondecreasing
  return sizes, groups, search(index, jnp.arange(len(sizes) + 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _grouped_loops(fn: Callable, num_sizes: int, ops: dict) -> tuple[jax.Array, ...]:
  """`fn` per group of images, at its size, by one loop per size over the groups of that size:
  each body has a static size, so it reads and writes its images' leading slots alone (no switch,
  no output padded to the cap). The loops' lengths depend on the data (no automatic reverse mode):
  the backward is `_grouped_loops_bwd`."""
  sizes, groups, bounds = _groups_by_size(ops, num_sizes)
  b, num_queries = ops['query_mask'].shape
  shapes = jax.eval_shape(lambda: _call(fn, _cut(ops, sizes[-1], groups[0])))
  outs = tuple(_fresh_zeros((b, num_queries, *s.shape[2:]), s.dtype, bounds[0]) for s in shapes)

  def group(size, g, outs):
    images = groups[g]
    ys = _call(fn, _cut(ops, size, images))
    return tuple(o.at[images, : y.shape[1]].set(y, unique_indices=True)
                 for o, y in zip(outs, ys, strict=True))  # fmt: skip

  return _loops_per_size(sizes, bounds, group, outs)


def _loops_per_size(sizes: Sequence[int], bounds: jax.Array, group: Callable, carry):
  """`carry = group(size, g, carry)` for every group g, at its size: one loop per size over
  groups[bounds[i] : bounds[i + 1]] (`_groups_by_size`)."""
  for i, size in enumerate(sizes):
    carry = jax.lax.fori_loop(bounds[i], bounds[i + 1], functools.partial(group, size), carry)
  return carry


def _grouped_loops_fwd(fn, num_sizes, ops):
  return _grouped_loops(fn, num_sizes, ops), ops


def _inexact(tree) -> bool:
  return all(jnp.issubdtype(x.dtype, jnp.inexact) for x in jax.tree.leaves(tree))


def _grouped_loops_bwd(fn, num_sizes, ops, cts):
  """The same loops, each group recomputing its forward for its VJP (the residuals are the inputs
  alone) and adding its gradients to its images' slots. Index inputs (the kept rows) get none."""
  sizes, groups, bounds = _groups_by_size(ops, num_sizes)
  floats = {k: v for k, v in ops.items() if _inexact(v)}  # q, k, v and the masks
  grads = jax.tree.map(lambda x: _fresh_zeros(x.shape, x.dtype, bounds[0]), floats)

  def group(size, g, grads):
    images = groups[g]
    cut = _cut(ops, size, images)
    ys, vjp = jax.vjp(lambda f: _call(fn, cut | f), {k: cut[k] for k in floats})
    (d,) = vjp(tuple(ct[images, : y.shape[1]] for ct, y in zip(cts, ys, strict=True)))
    return {k: jax.tree.map(lambda a, x, k=k: a.at[images, _rows(ops, k, size)].add(
                              x, unique_indices=True), grads[k], d[k])
            for k in grads}  # fmt: skip

  grads = _loops_per_size(sizes, bounds, group, grads)
  none = {k: jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), v)
          for k, v in ops.items() if k not in floats}  # fmt: skip
  return (grads | none,)


_grouped_loops.defvjp(_grouped_loops_fwd, _grouped_loops_bwd)


def _grouped(fn: Callable, ops: dict, num_sizes: int) -> tuple[jax.Array, ...]:
  """Attention per group of `ATTENTION_GROUP` images of similar token counts, each group at the
  ladder size that holds its fullest image (`_grouped_loops`); one group (`_compacted`, a switch)
  when the batch has no more images, or does not split evenly.

  In a large batch the fullest image is near the cap, so one size for the whole batch would run
  every image's attention at full length. Attention is per image, so grouping changes no number.
  Larger groups mean fewer loop steps, which a GPU wants (`experiments/gpu_executions.py`).
  """
  b = ops['query_mask'].shape[0]
  if b <= ATTENTION_GROUP or b % ATTENTION_GROUP:
    return _compacted(fn, ops, num_sizes)
  return _grouped_loops(fn, num_sizes, ops)


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


def _flat(
  fn: TokenFn, modules, xs: tuple[jax.Array, ...], per_image: tuple[jax.Array, ...] = ()
) -> tuple[jax.Array, ...]:
  """`fn` on the tokens of xs [B, N, ...] as rows [B*N, ...] (each with its image's row of
  per_image [B, ...]): XLA on CPU runs 2-D products and the elementwise work fused with them
  faster than 3-D ones (DeiT-S at batch 32: 1644 against 1750 ms dense; its MLP alone 91 against
  104 ms)."""
  b, n = xs[0].shape[:2]
  ys = fn(modules, *(x.reshape(b * n, *x.shape[2:]) for x in xs),
          *(jnp.broadcast_to(a[:, None], (b, n, *a.shape[1:])).reshape(b * n, *a.shape[1:])
            for a in per_image))  # fmt: skip
  return tuple(y.reshape(b, n, *y.shape[1:]) for y in ys)


def token_map(
  fn: TokenFn,
  modules,
  *xs: jax.Array,
  mask: jax.Array | None,
  num_chunks: int,
  per_image: tuple[jax.Array, ...] = (),
) -> tuple[jax.Array, ...]:
  """`fn(modules, *xs, *per_image)` on every token of xs [B, N, ...], each token with its image's
  row of per_image [B, ...]: see the module docstring for where.

  `modules` are the nnx modules `fn` uses (their parameters get gradients); mask [B, N] or None.
  """
  if mask is None:
    return _flat(fn, modules, xs, per_image)

  def padded():
    return tuple(_zero_padded(y, mask) for y in _flat(fn, modules, xs, per_image))

  if not num_chunks:
    return padded()
  graphdef, params = nnx.split(modules)

  def pure(params, *tokens):
    return fn(nnx.merge(graphdef, params), *tokens)

  def run(params, xs, per_image, mask):
    return _packed(pure, params, xs, per_image, mask, num_chunks)

  packed = functools.partial(
    _data_parallel(run, replicated=1), params, tuple(xs), tuple(per_image), mask > 0
  )
  slots = mask.shape[0] * mask.shape[1]
  if slots > chunk_rows(slots, num_chunks):
    return packed()
  return jax.lax.cond(jnp.sum(mask > 0) > FULL_FRACTION * slots, padded, packed)


def slot_map(
  fn: Callable,
  keys: tuple[jax.Array, ...],
  key_mask: jax.Array | None,
  queries: tuple[jax.Array, ...],
  query_mask: jax.Array | None,
  *,
  num_sizes: int,
) -> tuple[jax.Array, ...]:
  """`fn(keys=, key_mask=, queries=, query_mask=)` -> outputs [B, Nq, ...], on the fewest leading
  slots that hold the tokens of each group's fullest image (a ladder of `num_sizes` sizes,
  `_grouped`), or on all slots when 0 or nothing is masked. keys [B, Nk, ...], queries
  [B, Nq, ...] (Nq <= Nk)."""
  if query_mask is None or not num_sizes:
    return fn(keys=keys, key_mask=key_mask, queries=queries, query_mask=query_mask)
  ops = dict(keys=keys, queries=queries, query_mask=query_mask)
  if key_mask is not None:
    ops['key_mask'] = key_mask
  run = _data_parallel(lambda ops: _grouped(fn, ops, num_sizes), replicated=0)
  return run(ops)
