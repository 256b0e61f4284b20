"""Data parallelism over every device of every host: one mesh axis, `jit` with `NamedSharding`.

Parameters are replicated, or with `fsdp` sharded over the same axis along their largest divisible
dimension (big_vision's FSDP rule), which XLA gathers where they are used.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh() -> Mesh:
  """A 1-D mesh of every device of every host; XLA propagates shardings (Auto axis)."""
  return jax.make_mesh(
    (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
  )


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_sharding(abstract_tree, mesh: Mesh, fsdp: bool):
  """Shardings for a tree of arrays (or shape structs): replicated, or FSDP when `fsdp`."""
  devices = mesh.shape[DATA_AXIS]

  def spec(leaf) -> NamedSharding:
    shape = getattr(leaf, 'shape', ())
    if not fsdp or not shape:
      return replicated(mesh)
    for axis in np.argsort(shape)[::-1]:  # the largest dimension that splits evenly
      if shape[axis] % devices == 0 and shape[axis] >= devices:
        return NamedSharding(
          mesh, P(*[DATA_AXIS if i == axis else None for i in range(len(shape))])
        )
    return replicated(mesh)

  return jax.tree.map(spec, abstract_tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's share of a batch -> global arrays split over every device (multi-host safe)."""
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def device_batches(
  local: Iterable[dict[str, np.ndarray]], mesh: Mesh, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """global_batch of each local batch, `size` batches ahead (flax's prefetch_to_device for jit):
  the copies to the devices run while the step before them computes."""
  queue = collections.deque()
  for batch in local:
    queue.append(global_batch(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
