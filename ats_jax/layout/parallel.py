"""Token layouts per device: each device lays out its own images, so no token crosses devices."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P


def num_shards(axis_name: str) -> int:
  """Devices the set mesh (`jax.set_mesh`) splits the batch over along `axis_name`; 1 without."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis_name not in mesh.axis_names:
    return 1
  return mesh.shape[axis_name]


def data_parallel(run: Callable, replicated: int, axis_name: str) -> Callable:
  """`run` per device over the mesh's `axis_name` when the set mesh has it (`shard_map`); its first
  `replicated` arguments (parameters) whole on every device, the rest split by image."""
  if num_shards(axis_name) == 1:
    return run

  def per_device(*args):
    split = (P(),) * replicated + (P(axis_name),) * (len(args) - replicated)
    return jax.shard_map(run, in_specs=split, out_specs=P(axis_name), check_vma=False)(*args)

  return per_device
