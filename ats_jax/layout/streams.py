"""Per-token work on a token layout: on every slot, or on a stream of the batch's real tokens.

Everything in a transformer block except attention (norm1, qkv, proj, norm2, the MLP: about 90% of
its FLOPs at 197 tokens) treats each token on its own. `token_map` is the one place that decides
where that work runs, given a token mask [B, N] (real tokens first in each image's slots) and the
model's `Execution`:

- no mask (before the first ATS block), or 'padded': on every slot, padded slots zeroed after;
- 'packed': on one flat stream of the batch's real tokens, image after image, in loop steps of
  B*N / `pack_chunks` rows, then the rest in pieces of `align`, 2 `align`, ... rows (its binary
  digits, one `lax.cond` each): the cost follows the batch's real tokens to within `align` rows;
- 'budgeted': on a stream of a static `budget` rows per device, one product per layer, no control
  flow; tokens past the budget are not computed (the model flags that batch, `stats['overflow']`).

Streams gather their rows and scatter results back by indices computed from the mask by cumulative
sums (`stream_indices`), so shapes stay static under `jit`. Every mode applies the same function to
the same real tokens: they give the same numbers (`docs/execution.md`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ats_jax.layout.execution import Execution
from ats_jax.layout.parallel import data_parallel

TokenFn = Callable[..., tuple[jax.Array, ...]]  # (modules, *tokens [..., C_in]) -> [..., C_out]


def chunk_rows(total: int, execution: Execution) -> int:
  """Rows per loop step of a packed stream of `total` slots: total / pack_chunks, at least
  `min_chunk`, at most `total`, rounded up to a multiple of `align`."""
  align = execution.align
  rows = max(execution.min_chunk, -(-total // execution.pack_chunks))
  return min(-(-total // align), -(-rows // align)) * align


def stream_indices(
  mask: jax.Array, length: int, search: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Where each row of a stream of `length` rows reads and writes, and how many are real.

  mask [B, N] bool, real tokens first -> source [L] (the flat B*N slot each stream row reads: image
  after image), dest [L] (the slot it writes: its source, or B*N, out of bounds, for the rows past
  the batch's total) and that total. Rows past the total read the first image's cls token (real,
  so finite); what they write is never read. `search`: `jnp.searchsorted`'s method.
  """
  b, n = mask.shape
  counts = jnp.sum(mask, axis=-1)  # [B]
  ends = jnp.cumsum(counts)
  starts = ends - counts
  row = jnp.arange(length)
  image = jnp.searchsorted(ends, row, side='right', method=search)
  image = jnp.minimum(image, b - 1)  # [L]
  real = row < ends[-1]
  slot = image * n + jnp.clip(row - starts[image], 0, n - 1)
  return jnp.where(real, slot, 0), jnp.where(real, slot, b * n), ends[-1]


def tail_sizes(rows: int, align: int) -> list[int]:
  """align, 2 align, 4 align, ... below `rows`: any multiple of `align` short of `rows` is a sum of
  distinct ones."""
  sizes = [align]
  while sizes[-1] * 2 < rows:
    sizes.append(sizes[-1] * 2)
  return [size for size in sizes if size < rows]


def _stream_pieces(total: jax.Array, length: int, rows: int, align: int, body: Callable, carry):
  """`carry = body(start, size, carry)` over the rows [0, total) of a stream of `length`, rounded up
  to `align`: whole chunks of `rows` in a loop (one compiled body, whatever the total), then what
  is left in at most one piece of each of `tail_sizes`, each under a `lax.cond`. So the products
  stay large, and at most `align` - 1 rows past the total are computed."""
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


def _rows_of(indices: jax.Array, start: jax.Array, size: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(indices, start, size)


def _slots_per_image(flats, per_image) -> int:
  """N, from flats [B*N, ...] and per_image [B, ...] (1 without per_image: never used then)."""
  return flats[0].shape[0] // per_image[0].shape[0] if per_image else 1


def _inputs_of(flats, per_image, slots: jax.Array) -> list[jax.Array]:
  """The rows of flats [B*N, ...] at `slots`, then those of per_image [B, ...] at their images."""
  n = _slots_per_image(flats, per_image)
  return [f[slots] for f in flats] + [a[slots // n] for a in per_image]


def _fresh_zeros(shape: Sequence[int], dtype: jnp.dtype, count: jax.Array) -> jax.Array:
  """Zeros computed from `count` (>= 0, of this call's data), so only once its data exists.

  Constant zeros would be one buffer that XLA shares between every block's loop and copies for
  each loop up front, all the copies alive at once (`docs/execution.md`, memory).
  """
  return jnp.full(shape, count < 0, dtype)


def _write(out: jax.Array, dst: jax.Array, y: jax.Array, add: bool = False) -> jax.Array:
  """out[dst] = y (or += y), rows of out in increasing order; out-of-bounds rows dropped."""
  at = out.at[dst]
  return (at.add if add else at.set)(y, indices_are_sorted=True, mode='drop')


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _stream_map(fn: Callable, rows: int, align: int, params, flats, per_image, source, dest, total):
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

  return _stream_pieces(total, source.shape[0], rows, align, piece, outs)


def _stream_map_fwd(fn, rows, align, params, flats, per_image, source, dest, total):
  residuals = (params, flats, per_image, source, dest, total)
  return _stream_map(fn, rows, align, params, flats, per_image, source, dest, total), residuals


def _stream_map_bwd(fn, rows, align, residuals, cts):
  """The stream in whole chunks, each recomputing its forward for its VJP: the residuals are the
  inputs alone (no activation is kept, as under `jax.checkpoint`). No tail: its conds would add
  a third to a training step's compile time for no measured gain (`docs/execution.md`)."""
  del align
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
  dparams, dflats, dimages = _stream_pieces(total, source.shape[0], rows, rows, piece, init)
  return dparams, dflats, dimages, None, None, None


_stream_map.defvjp(_stream_map_fwd, _stream_map_bwd)


def _flatten(xs: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  return tuple(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]) for x in xs)


def _unflatten(ys: Sequence[jax.Array], b: int, n: int) -> tuple[jax.Array, ...]:
  return tuple(y.reshape(b, n, *y.shape[1:]) for y in ys)


def _packed(fn: Callable, params, xs, per_image, mask: jax.Array, execution: Execution):
  """`fn(params, *tokens, *their images' rows)` on the real tokens of xs [B, N, ...], packed,
  piece by piece."""
  b, n = mask.shape
  rows = chunk_rows(b * n, execution)
  length = -(-b * n // rows) * rows  # whole chunks (the backward runs no tail)
  source, dest, total = stream_indices(mask, length, execution.search)
  ys = _stream_map(fn, rows, execution.align, params, _flatten(xs), per_image, source, dest, total)
  return _unflatten(ys, b, n)


def _budgeted(fn: Callable, params, xs, per_image, mask: jax.Array, length: int, search: str):
  """`fn(params, *tokens, *their images' rows)` on the first `length` real tokens of xs
  [B, N, ...]: one gather, one call on [length, ...] rows, one scatter; padded slots (and any
  token past the budget) get zeros. Plain autodiff: gathers and scatters transpose to each
  other, and the activations kept for the backward are the stream's, not the slots'."""
  b, n = mask.shape
  source, dest, _ = stream_indices(mask, length, search)
  ys = fn(params, *_inputs_of(_flatten(xs), per_image, source))
  outs = tuple(
    jnp.zeros((b * n, *y.shape[1:]), y.dtype).at[dest].set(y, indices_are_sorted=True, mode='drop')
    for y in ys
  )
  return _unflatten(outs, b, n)


def _flat(
  fn: TokenFn, modules, xs: tuple[jax.Array, ...], per_image: tuple[jax.Array, ...] = ()
) -> tuple[jax.Array, ...]:
  """`fn` on the tokens of xs [B, N, ...] as rows [B*N, ...] (each with its image's row of
  per_image [B, ...]): XLA on CPU runs 2-D products, and the elementwise work fused with them,
  faster than 3-D ones."""
  b, n = xs[0].shape[:2]
  ys = fn(modules, *_flatten(xs),
          *(jnp.broadcast_to(a[:, None], (b, n, *a.shape[1:])).reshape(b * n, *a.shape[1:])
            for a in per_image))  # fmt: skip
  return _unflatten(ys, b, n)


def _zero_padded(y: jax.Array, mask: jax.Array) -> jax.Array:
  """y [B, N, ...] with padded slots 0, whatever they held (`where`: even inf or NaN)."""
  return jnp.where(mask.reshape(*mask.shape, *(1,) * (y.ndim - 2)) > 0, y, 0)


def token_map(
  fn: TokenFn,
  modules,
  *xs: jax.Array,
  mask: jax.Array | None,
  execution: Execution,
  budget: int | None = None,
  per_image: tuple[jax.Array, ...] = (),
) -> tuple[jax.Array, ...]:
  """`fn(modules, *xs, *per_image)` on every token of xs [B, N, ...], each token with its image's
  row of per_image [B, ...]: see the module docstring for where.

  `modules` are the nnx modules `fn` uses (their parameters get gradients); mask [B, N] or None;
  `budget`: the stream's rows per device in budgeted execution (None: padded).
  """
  if mask is None:
    return _flat(fn, modules, xs, per_image)

  def padded():
    return tuple(_zero_padded(y, mask) for y in _flat(fn, modules, xs, per_image))

  mode = execution.mode
  if mode == 'padded' or (mode == 'budgeted' and budget is None):
    return padded()
  graphdef, params = nnx.split(modules)

  def pure(params, *tokens):
    return fn(nnx.merge(graphdef, params), *tokens)

  def run(params, xs, per_image, mask):
    b, n = mask.shape  # this device's images
    if mode == 'budgeted':
      if budget >= b * n:  # a budget of every slot: nothing to skip
        return tuple(_zero_padded(y, mask) for y in _flat(pure, params, xs, per_image))
      return _budgeted(pure, params, xs, per_image, mask, budget, execution.search)
    return _packed(pure, params, xs, per_image, mask, execution)

  stream = functools.partial(
    data_parallel(run, replicated=1, axis_name=execution.axis_name),
    params, tuple(xs), tuple(per_image), mask > 0,
  )  # fmt: skip
  slots = mask.shape[0] * mask.shape[1]
  if mode == 'budgeted' or slots > chunk_rows(slots, execution):
    return stream()
  # a packed stream of one chunk (batch 1) that is nearly full costs more than its slots
  return jax.lax.cond(jnp.sum(mask > 0) > execution.full_fraction * slots, padded, stream)
