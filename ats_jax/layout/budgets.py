"""The host side of budgeted execution: each batch's budgets, and the re-run of a batch that
overflowed, so results are always those of padded execution.

A budgeted program has a static stream length per block. `BudgetRunner` starts from padded
execution (its first batch measures the tokens each block keeps), sets budgets to that count plus
a margin, rounded up to `budget_align` rows, raises them at once when a batch comes close or
overflows, and lowers them only after `patience` batches that all fit well below: a run compiles a
handful of programs, not one per batch. A batch that overflowed is never used: it is run again
padded (one more program, compiled once), whose counts then raise the budgets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from absl import logging

from ats_jax.layout.execution import Execution

Carry = TypeVar('Carry')
Result = TypeVar('Result')


@dataclasses.dataclass
class BudgetRunner:
  """Runs steps of a budgeted model with budgets that follow the data.

  Attributes:
    execution: the model's execution; its `budgets` are the current ones (empty: calibrating; a
      user's explicit budgets are kept, never adapted, when `adapt` is False).
    slots: per block, the slots of one device's share of the batch (its batch times the block's
      token cap), or None for blocks before the first ATS block (always padded).
    margin: budgets are the measured tokens times 1 + margin.
    patience: batches whose needs all fit below the budgets before they are lowered.
    adapt: False keeps the budgets given (only overflow re-runs happen).
    reruns: batches run again after an overflow.
  """

  execution: Execution
  slots: tuple[int | None, ...]
  margin: float = 0.08
  patience: int = 20
  adapt: bool = True
  reruns: int = 0
  _recent: list[np.ndarray] = dataclasses.field(default_factory=list)
  _programs: set[tuple[int | None, ...]] = dataclasses.field(default_factory=set)

  @classmethod
  def for_model(cls, model, batch_per_device: int, **kwargs) -> BudgetRunner:
    """A runner for `model` (a `VisionTransformer`) at `batch_per_device` images per device."""
    tokens, seen_ats, slots = model.pos_embed.shape[1], False, []
    for block in model.blocks:
      if block.sampling is not None:
        tokens, seen_ats = min(block.sampling.cap, tokens), True
      slots.append(batch_per_device * tokens if seen_ats else None)
    execution = model.execution
    kwargs.setdefault('adapt', not execution.budgets)
    return cls(execution, tuple(slots), **kwargs)

  @property
  def active(self) -> bool:
    """Budgeted execution with some block to budget (a dense model runs as it is)."""
    return self.execution.mode == 'budgeted' and any(s is not None for s in self.slots)

  @property
  def budgets(self) -> tuple[int | None, ...]:
    return self.execution.budgets

  @property
  def programs(self) -> int:
    """Distinct budget sets run so far (each one compiled program per step function)."""
    return len(self._programs)

  def use(self) -> float:
    """Real tokens over budget rows in the last batch, over the budgeted blocks (nan: none)."""
    if not self._recent or not any(b is not None for b in self.budgets):
      return float('nan')
    needed = self._recent[-1]
    pairs = [(n, b) for n, b in zip(needed, self.budgets, strict=False) if b is not None]
    return float(sum(n for n, _ in pairs) / sum(b for _, b in pairs))

  def run(
    self,
    call: Callable[[Execution, Carry], Result],
    carry: Carry,
    report: Callable[[Result], tuple[Any, Any]],
    carry_of: Callable[[Result], Carry] | None = None,
  ) -> Result:
    """`call(execution, carry)` with the current budgets; if `report(result)` says it overflowed
    (a bool and the per-block `stream_tokens`, on the device), again padded, from
    `carry_of(result)` (default: `carry`; a train step that overflowed returns its old state).
    Then the budgets follow the batch's counts."""
    if not self.active:
      return call(self.execution, carry)
    self._programs.add(self.budgets)
    result = call(self.execution, carry)
    overflow, streams = jax.device_get(report(result))
    if overflow:
      self.reruns += 1
      logging.info('Token budgets %s overflowed (%s kept): re-run padded', self.budgets, streams)
      retry = carry if carry_of is None else carry_of(result)
      result = call(self.execution.with_budgets(()), retry)
      streams = jax.device_get(report(result)[1])  # padded execution never overflows
    self.observe(np.asarray(streams), bool(overflow))
    return result

  def _needed(self, streams: np.ndarray) -> tuple[int | None, ...]:
    """Budgets for counts `streams` [depth]: count times 1 + margin, rounded up; None where that
    is every slot (padded costs no more)."""
    align = self.execution.budget_align
    needed = []
    for count, slots in zip(streams, self.slots, strict=True):
      rows = math.ceil(count * (1 + self.margin) / align) * align if slots else None
      needed.append(None if rows is None or rows >= slots else rows)
    return tuple(needed)

  def observe(self, streams: np.ndarray, overflowed: bool = False) -> None:
    """A batch's per-block counts [depth] (`stats['stream_tokens']`): raises budgets at once to
    what it needs; lowers them to the most the last `patience` batches needed once they all
    needed less."""
    self._recent = (self._recent + [streams])[-self.patience :]
    if not self.adapt and not overflowed:
      return
    needed = self._needed(streams)
    current = self.budgets or (0,) * len(self.slots)
    raised = any(_rows(n) > _rows(c) for n, c in zip(needed, current, strict=True))
    if raised:
      new = tuple(
        None if n is None or (c is None and self.budgets) else max(_rows(n), _rows(c))
        for n, c in zip(needed, current, strict=True)
      )
      self._set(new, 'raised' if self.budgets else 'calibrated')
      return
    if self.adapt and len(self._recent) == self.patience:
      window = self._needed(np.max(np.stack(self._recent), axis=0))
      if window != self.budgets and all(
        _rows(w) <= _rows(c) for w, c in zip(window, current, strict=True)
      ):
        self._set(window, 'lowered')

  def _set(self, budgets: Sequence[int | None], why: str) -> None:
    logging.info('Token budgets %s: %s (rows per device and block)', why, tuple(budgets))
    self.execution = self.execution.with_budgets(tuple(budgets))
    self._recent = self._recent[-1:]


def _rows(budget: int | None) -> float:
  """A budget as a number of rows: None (padded) is more than any."""
  return math.inf if budget is None else budget
