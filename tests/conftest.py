"""Shared fixtures: timm reference models with random weights, and their logits."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch


def random_timm_model(name: str, seed: int = 0) -> torch.nn.Module:
  """timm's `name` in eval mode with every parameter perturbed, so no weight is a trivial 0 or 1."""
  torch.manual_seed(seed)
  return perturbed(timm.create_model(name, pretrained=False))


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
  """`model` in eval mode with N(0, 0.05) noise on every parameter (seed the generator first)."""
  model.eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.05)
  return model


def timm_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  """timm's logits for NHWC images."""
  with torch.no_grad():
    return model(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)).numpy()


@pytest.fixture
def images():
  def make(batch: int = 4, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)

  return make
