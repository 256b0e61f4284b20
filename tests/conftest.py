"""Shared fixtures. `tests.references` (timm, torch) is imported first: torch's triton loaded
after TensorFlow crashes the interpreter, and pytest imports this file before any test module."""

from __future__ import annotations

import numpy as np
import pytest

import tests.references  # noqa: F401  (first: see the docstring)


@pytest.fixture
def images():
  def make(batch: int = 4, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)

  return make
