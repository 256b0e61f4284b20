"""Token layouts: where per-token work and attention run once ATS has masked tokens (padded,
packed, budgeted), with the custom VJPs that keep their memory at the inputs."""

from ats_jax.layout.execution import PADDED, Execution, resolve
from ats_jax.layout.slots import Slots, slot_map
from ats_jax.layout.streams import token_map

__all__ = ['PADDED', 'Execution', 'Slots', 'resolve', 'slot_map', 'token_map']
