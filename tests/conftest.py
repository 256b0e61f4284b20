"""Shared fixtures. `tests.references` (timm, torch) is imported first: torch's triton loaded
after TensorFlow crashes the interpreter, and pytest imports this file before any test module."""

from __future__ import annotations

import os

# Tests check numbers, not XLA's optimiser: unoptimised programs compile in about 2/3 the time
# (docs/architecture.md). Memory tests ask for the `optimized` programs users run.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tests.references  # noqa: E402, F401  (first: see the docstring)


@pytest.fixture
def optimized():
  """XLA's full optimisation for this test's compiles (what memory analysis must see)."""
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', before)


@pytest.fixture
def images():
  def make(batch: int = 4, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)

  return make
