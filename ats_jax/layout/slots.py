"""Attention on a token layout: per image, on its padded slots, or on the fewest leading slots that
hold each group of similar images (packed execution).

Attention's cost is per image, so packed execution runs it in groups of `attention_group` images of
similar token counts, each on the fewest leading slots that hold its fullest image's tokens, from a
ladder of `attention_sizes` sizes: one loop per size over the groups of that size. Under `grad`,
custom VJPs keep only the inputs and recompute group by group (a loop with a data-dependent length
has no automatic reverse mode), and a small batch's attention the branch taken (the backward of a
`lax.switch` would otherwise keep every branch's residuals, zero-filled). Padded and budgeted
execution attend every slot, with each image's key count passed to fused kernels
(`ats_jax.ops.attention.fused_attention`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ats_jax.layout.execution import Execution
from ats_jax.layout.parallel import data_parallel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  """What attention reads: keys [B, Nk, ...] with their mask [B, Nk] (None: every key real, and
  every slot is read whatever the size), and queries [B, Nq, ...] (Nq <= Nk; () when every key
  slot asks) with their mask [B, Nq], which sizes the work."""

  keys: tuple[jax.Array, ...]
  key_mask: jax.Array | None
  queries: tuple[jax.Array, ...]
  query_mask: jax.Array | None

  @property
  def counted(self) -> jax.Array:
    """The mask whose counts size attention: the keys' when masked (they hold at least the
    queries), else the queries'."""
    return self.query_mask if self.key_mask is None else self.key_mask

  def key_rows(self, size: int) -> slice:
    """The key slots a size reads: all of them when keys are unmasked, else the first `size`."""
    return slice(None) if self.key_mask is None else slice(size)

  def cut(self, size: int, images: jax.Array | None = None) -> Slots:
    """What `images` (indices [G] into the batch; None: all of it) need on `size` leading slots.
    Reading only those slots is what makes attention's cost follow the size."""

    def take(x: jax.Array, rows: slice) -> jax.Array:
      return x[:, rows] if images is None else x[images, rows]

    keys = self.key_rows(size)
    return Slots(
      tuple(take(k, keys) for k in self.keys),
      None if self.key_mask is None else take(self.key_mask, keys),
      tuple(take(q, slice(size)) for q in self.queries),
      take(self.query_mask, slice(size)),
    )


def ladder(total: int, execution: Execution) -> tuple[int, ...]:
  """Slot counts for attention: `attention_sizes` sizes in geometric steps from
  total * `min_fraction` to total, none under `min_slots` (or `total`).

  Geometric steps waste the same share of work at every count: rounding up costs at most the step
  ratio, half of it on average.
  """
  num_sizes = execution.attention_sizes
  if num_sizes == 1:
    return (total,)
  ratio = (1 / execution.min_fraction) ** (1 / (num_sizes - 1))
  floor = min(total, execution.min_slots)
  return tuple(sorted({max(floor, math.ceil(total / ratio**i)) for i in range(num_sizes)}))


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


def _fresh_zeros(shape: Sequence[int], dtype: jnp.dtype, count: jax.Array) -> jax.Array:
  """Zeros of this call's data (see `streams._fresh_zeros`): not one buffer shared by loops."""
  return jnp.full(shape, count < 0, dtype)


def _compacted(fn: Callable, slots: Slots, execution: Execution) -> tuple[jax.Array, ...]:
  """`fn` on the fewest leading slots (from the ladder) that hold the batch's fullest image.
  Returns fn's outputs [B, Nq, ...], padded with zeros after the size."""
  sizes = ladder(slots.counted.shape[1], execution)
  num_queries = slots.query_mask.shape[1]

  def branch(size: int):
    def run(slots):
      return tuple(jnp.pad(y, [(0, 0), (0, num_queries - y.shape[1])] + [(0, 0)] * (y.ndim - 2))
                   for y in fn(slots.cut(size)))  # fmt: skip

    return run

  needed = jnp.max(jnp.sum(slots.counted > 0, axis=-1))
  index = jnp.searchsorted(jnp.asarray(sizes), needed, side='left', method='compare_all')
  return switch_remat(index, branch, sizes, slots)


def _groups_by_size(slots: Slots, execution: Execution):
  """Images in groups of `attention_group` of similar token counts, and each group's size.

  -> the ladder, groups [B / G, G] (image indices, fewest tokens first) and bounds [sizes + 1]:
  the groups that run at sizes[i] are groups[bounds[i] : bounds[i + 1]] (sorted by count, the
  groups need nondecreasing sizes).
  """
  counts = jnp.sum(slots.counted > 0, axis=-1)
  sizes = ladder(slots.counted.shape[1], execution)
  groups = jnp.argsort(counts).reshape(-1, execution.attention_group)
  search = functools.partial(jnp.searchsorted, side='left', method='compare_all')
  index = search(jnp.asarray(sizes), jnp.max(counts[groups], axis=-1))  # [B / G] nondecreasing
  return sizes, groups, search(index, jnp.arange(len(sizes) + 1))


def _loops_per_size(sizes: Sequence[int], bounds: jax.Array, group: Callable, carry):
  """`carry = group(size, g, carry)` for every group g, at its size: one loop per size over
  groups[bounds[i] : bounds[i + 1]] (`_groups_by_size`)."""
  for i, size in enumerate(sizes):
    carry = jax.lax.fori_loop(bounds[i], bounds[i + 1], functools.partial(group, size), carry)
  return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _grouped_loops(fn: Callable, execution: Execution, slots: Slots) -> tuple[jax.Array, ...]:
  """`fn` per group of images, at its size, by one loop per size over the groups of that size:
  each body has a static size, so it reads and writes its images' leading slots alone (no switch,
  no output padded to the cap). The loops' lengths depend on the data (no automatic reverse mode):
  the backward is `_grouped_loops_bwd`."""
  sizes, groups, bounds = _groups_by_size(slots, execution)
  b, num_queries = slots.query_mask.shape
  shapes = jax.eval_shape(lambda: fn(slots.cut(sizes[-1], groups[0])))
  outs = tuple(_fresh_zeros((b, num_queries, *s.shape[2:]), s.dtype, bounds[0]) for s in shapes)

  def group(size, g, outs):
    images = groups[g]
    ys = fn(slots.cut(size, images))
    return tuple(o.at[images, : y.shape[1]].set(y, unique_indices=True)
                 for o, y in zip(outs, ys, strict=True))  # fmt: skip

  return _loops_per_size(sizes, bounds, group, outs)


def _grouped_loops_fwd(fn, execution, slots):
  return _grouped_loops(fn, execution, slots), slots


def _inexact(x: jax.Array) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def _grouped_loops_bwd(fn, execution, slots, cts):
  """The same loops, each group recomputing its forward for its VJP (the residuals are the inputs
  alone) and adding its gradients to its images' slots. Index inputs (the kept rows) get none."""
  sizes, groups, bounds = _groups_by_size(slots, execution)
  grads = jax.tree.map(
    lambda x: _fresh_zeros(x.shape, x.dtype, bounds[0]) if _inexact(x) else None, slots
  )

  def group(size, g, grads):
    images = groups[g]
    cut = slots.cut(size, images)
    ys, vjp = jax.vjp(fn, cut)
    (d,) = vjp(tuple(ct[images, : y.shape[1]] for ct, y in zip(cts, ys, strict=True)))

    def add(a, x, rows):
      return None if a is None else a.at[images, rows].add(x, unique_indices=True)

    keys, rest = slots.key_rows(size), slice(size)
    return Slots(
      tuple(add(a, x, keys) for a, x in zip(grads.keys, d.keys, strict=True)),
      None if grads.key_mask is None else add(grads.key_mask, d.key_mask, keys),
      tuple(add(a, x, rest) for a, x in zip(grads.queries, d.queries, strict=True)),
      add(grads.query_mask, d.query_mask, rest),
    )

  grads = _loops_per_size(sizes, bounds, group, grads)
  zero = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), slots)
  return (jax.tree.map(lambda g, z: z if g is None else g, grads, zero, is_leaf=_none),)


def _none(x) -> bool:
  return x is None


_grouped_loops.defvjp(_grouped_loops_fwd, _grouped_loops_bwd)


def _grouped(fn: Callable, slots: Slots, execution: Execution) -> tuple[jax.Array, ...]:
  """Attention per group of `attention_group` images of similar token counts, each group at the
  ladder size that holds its fullest image (`_grouped_loops`); one group (`_compacted`, a switch)
  when the batch has no more images, or does not split evenly.

  In a large batch the fullest image is near the cap, so one size for the whole batch would run
  every image's attention at full length. Attention is per image, so grouping changes no number.
  """
  b = slots.query_mask.shape[0]
  group = execution.attention_group
  if b <= group or b % group:
    return _compacted(fn, slots, execution)
  return _grouped_loops(fn, execution, slots)


def slot_map(
  fn: Callable[[Slots], tuple[jax.Array, ...]], slots: Slots, execution: Execution
) -> tuple[jax.Array, ...]:
  """`fn(slots)` -> outputs [B, Nq, ...]: in packed execution on the fewest leading slots that
  hold the tokens of each group's fullest image (`_grouped`), else (or when nothing is masked) on
  every slot."""
  if slots.query_mask is None or execution.mode != 'packed':
    return fn(slots)
  run = data_parallel(
    lambda s: _grouped(fn, s, execution), replicated=0, axis_name=execution.axis_name
  )
  return run(slots)
