"""What a model's outputs mean, and how a dataset's classes map onto them.

A released ImageNet-1k checkpoint's output i is the i-th of the 1,000 sorted WordNet ids
(`imagenet_wnids.txt`, from timm's `timm/data/_info`, Apache-2.0), whatever subset of classes a
folder holds; a Hugging Face checkpoint names its outputs (`id2label`); a model trained here names
them after its train split's classes. Evaluation maps each class of the eval split to the output
of the same name, so `val/` alone, or a few of its classes, is scored in the checkpoint's own label
space (as timm's validation with `--class-map`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
from collections.abc import Sequence

import numpy as np

from ats_jax.errors import InputError

IMAGENET_CLASSES = 1000


@functools.cache
def _lines(name: str) -> tuple[str, ...]:
  """A file shipped in ats_jax/data, one entry per line."""
  return tuple(importlib.resources.files('ats_jax').joinpath('data', name).read_text().splitlines())


def imagenet_wnids() -> tuple[str, ...]:
  """ImageNet-1k's WordNet ids (n01440764, ...) in class order."""
  return _lines('imagenet_wnids.txt')


def imagenet_classes() -> tuple[str, ...]:
  """ImageNet-1k's class names (WordNet lemmas, 'tench, Tinca tinca', ...) in class order."""
  return _lines('imagenet_classes.txt')


@dataclasses.dataclass(frozen=True)
class Labels:
  """A model's label space: its class count and, where known, the name of each output."""

  num_classes: int
  names: tuple[str, ...] | None = None  # output i's class name; None: unnamed

  @classmethod
  def named(cls, names: Sequence[str]) -> Labels:
    """The label space whose outputs are `names`, in order."""
    return cls(len(names), tuple(names))

  def __post_init__(self):
    if self.names is not None and len(self.names) != self.num_classes:
      raise ValueError(f'{len(self.names)} class names for {self.num_classes} classes')

  def namings(self) -> list[tuple[str, ...]]:
    """Each naming of the outputs a dataset's class names may use, the model's own first; a
    1,000-class head is ImageNet-1k's, so its outputs are also the sorted wnids."""
    namings = [self.names] if self.names is not None else []
    if self.num_classes == IMAGENET_CLASSES:
      namings.append(imagenet_wnids())
    return namings

  def index_of(self, classes: Sequence[str], where: str) -> np.ndarray:
    """int32 [len(classes)]: the output each of a dataset's classes is, matched by name. Where the
    model names nothing, a dataset of as many classes is taken in order (e.g. a checkpoint of
    unknown origin on the folder it was trained on)."""
    for naming in self.namings():
      index = {name: i for i, name in enumerate(naming)}
      if all(c in index for c in classes):
        return np.array([index[c] for c in classes], np.int32)
    if not self.namings() and len(classes) == self.num_classes:
      return np.arange(self.num_classes, dtype=np.int32)
    raise InputError(f'the classes of {where} ({_sample(classes)}) {self._mismatch(classes)}')

  def _mismatch(self, classes: Sequence[str]) -> str:
    if not self.namings():
      return f'are {len(classes)}, but the model has {self.num_classes} unnamed classes'
    known = set().union(*self.namings())
    unknown = [c for c in classes if c not in known]
    examples = ' or '.join(f'{n[0]!r}' for n in self.namings())
    return (
      f'are not all classes of the model: {_sample(unknown)} match none of its '
      f'{self.num_classes} class names (such as {examples})'
    )


def _sample(names: Sequence[str], shown: int = 3) -> str:
  """'a, b, c and 7 more'."""
  more = f' and {len(names) - shown} more' if len(names) > shown else ''
  return ', '.join(names[:shown]) + more


def hf_names(id2label: dict | None, num_classes: int) -> tuple[str, ...] | None:
  """A Hugging Face config's `id2label` as names in output order; None where it names nothing
  (transformers' defaults read 'LABEL_0', 'LABEL_1', ...)."""
  if not id2label or len(id2label) != num_classes:
    return None
  names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
  return None if names == tuple(f'LABEL_{i}' for i in range(num_classes)) else names
