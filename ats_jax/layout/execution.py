"""How a model's blocks run once ATS has masked tokens: one frozen, hashable object.

A model holds one `Execution` as static state (it is part of the `nnx.GraphDef`), so a jitted step
compiles once per execution and a new budget is a new program, never a retrace of the same one.
All modes give the same predictions (`docs/execution.md`):

- 'padded': every slot, padded slots zeroed after. No control flow; cost of the cap.
- 'packed': per-token work on one stream of the batch's real tokens, in chunks (a loop with
  `lax.cond` tails) and attention per group of similar images on a ladder of slot counts. Its cost
  follows the batch's mean kept tokens, but each loop step and conditional waits for the host on
  XLA:GPU.
- 'budgeted': per-token work on a stream of `budgets[i]` rows per device for block i (static),
  one product per layer, and attention per image on its padded slots. No `while` or
  `conditional` in the program; a batch whose real tokens exceed a budget is flagged
  (`stats['overflow']`) and re-run by `ats_jax.layout.budgets.BudgetRunner`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ats_jax import backend

Mode = Literal['padded', 'packed', 'budgeted']
MODES = ('auto', 'padded', 'packed', 'budgeted')
SEARCHES = ('scan', 'scan_unrolled', 'compare_all')


@dataclasses.dataclass(frozen=True)
class Execution:
  """Static choices of a token layout; fields other than `mode` apply to the modes named.

  Attributes:
    mode: 'padded', 'packed' or 'budgeted'.
    search: `jnp.searchsorted`'s method in sampling and stream indexing: 'scan' is a `while`
      loop, 'scan_unrolled' straight-line code (what GPUs and budgeted execution need).
    pack_chunks: packed: loop steps of B*N / pack_chunks rows, at least `min_chunk`.
    min_chunk: packed: rows of a loop step at least (small products run far below peak).
    align: packed: the stream runs to its total rounded up to a multiple of this.
    full_fraction: packed: a one-chunk stream fuller than this runs padded (a `lax.cond`).
    attention_sizes: packed: slot counts of attention's ladder (1: one size, no switch).
    attention_group: packed: images sized together for attention.
    min_fraction, min_slots: packed: attention's smallest size, a fraction of the slots and a
      floor in slots.
    budgets: budgeted: per block, the rows of its per-token stream on each device (None: the
      block runs padded, as blocks before the first ATS block always do). Empty: all padded
      (what a `BudgetRunner` starts from to calibrate).
    budget_align: budgeted: budgets are multiples of this (what tensor cores and MXUs want).
    axis_name: the mesh axis that splits the batch: under a mesh with it, each device lays out
      its own images (`shard_map`), so no token crosses devices.
  """

  mode: Mode = 'padded'
  search: str = 'scan'
  pack_chunks: int = 64
  min_chunk: int = 256
  align: int = 16
  full_fraction: float = 0.75
  attention_sizes: int = 6
  attention_group: int = 4
  min_fraction: float = 0.125
  min_slots: int = 8
  budgets: tuple[int | None, ...] = ()
  budget_align: int = 128
  axis_name: str = 'data'

  def __post_init__(self):
    if self.mode not in MODES[1:]:
      raise ValueError(f'execution must be one of {MODES}, got {self.mode!r}')
    if self.search not in SEARCHES:
      raise ValueError(f'search must be one of {SEARCHES}, got {self.search!r}')
    if self.pack_chunks < 1:
      raise ValueError(
        f'pack_chunks must be >= 1 (1: the whole stream at once), got {self.pack_chunks}'
      )
    if self.attention_sizes < 1:
      raise ValueError(
        f'attention_sizes must be >= 1 (1: one size, no switch), got {self.attention_sizes}'
      )
    if self.mode == 'budgeted' and self.search == 'scan':
      raise ValueError("budgeted execution has no loops: its search must be 'scan_unrolled'")
    bad = [b for b in self.budgets if b is not None and (b < 1 or b % self.budget_align)]
    if bad:
      raise ValueError(
        f'budgets must be positive multiples of budget_align {self.budget_align}, got {bad}'
      )

  def budget(self, block: int) -> int | None:
    """Block `block`'s stream rows per device, or None (padded)."""
    return self.budgets[block] if block < len(self.budgets) else None

  def with_budgets(self, budgets: tuple[int | None, ...]) -> Execution:
    return dataclasses.replace(self, budgets=tuple(budgets))


PADDED = (
  Execution()
)  # what a block alone runs: every slot, no control flow beyond sampling's search


def resolve(execution: str | Execution = 'auto', **fields) -> Execution:
  """An `Execution` from a mode name ('auto': this backend's choice, `default_mode`) and field
  overrides (None: the default), or `execution` itself with the overrides applied."""
  fields = {k: v for k, v in fields.items() if v is not None}
  if isinstance(execution, Execution):
    return dataclasses.replace(execution, **fields)
  if execution not in MODES:
    raise ValueError(f'execution must be one of {MODES}, got {execution!r}')
  mode = backend.execution_mode() if execution == 'auto' else execution
  fields.setdefault('search', backend.search_method(mode))
  if 'budgets' in fields:
    fields['budgets'] = tuple(fields['budgets'])
  return Execution(mode=mode, **fields)
