"""What many tests share: a tiny ViT, weights that make attention sharp, a tiny training config.

No test module imports another one; they import this (and the fixtures of `conftest.py`).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ats_jax.models import vit as vit_lib
from configs import digits_ats

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
ENV = {'JAX_PLATFORMS': 'cpu', 'PATH': os.environ.get('PATH', ''), 'TF_CPP_MIN_LOG_LEVEL': '3'}


def perturb(model: nnx.Module, seed: int = 0, scale: float = 0.3) -> None:
  """Random LayerNorm/bias values and larger weights, so attention is not near-uniform."""
  rng = np.random.default_rng(seed)
  for param in vit_lib.param_dict(model).values():
    param[...] = param[...] + scale * rng.standard_normal(param.shape).astype(np.float32)


def tiny_config(**changes):
  """The digits config on a 2-block, 17-token model: a training step compiles in seconds."""
  config = digits_ats.get_config()
  config.model_overrides.update(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
  config.ats_blocks = (1,)
  config.num_tokens = (17.0,)
  config.batch_size = config.eval_batch_size = 32
  config.num_steps = 6
  config.warmup_epochs = 0.1
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 10
  config.log_every_steps = 1
  config.drop_path = 0.2  # stochastic depth on: resume and sharding must reproduce its draws
  for key, value in changes.items():
    config[key] = value
  return config


def loss_fn(model, images, labels, rng=None):
  """Mean cross-entropy of `model`'s logits (with `rng`: stochastic depth)."""
  logits = model(images, rng=rng)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def assert_same_gradients(reference: nnx.Module, model: nnx.Module, images: jnp.ndarray) -> None:
  """`model`'s loss and parameter gradients equal `reference`'s (the same weights, another
  execution), and reach the last block."""
  labels = jnp.arange(len(images)) % 10
  grad = nnx.jit(nnx.value_and_grad(loss_fn))
  (la, ga), (lb, gb) = grad(reference, images, labels), grad(model, images, labels)
  np.testing.assert_allclose(float(lb), float(la), rtol=1e-6)
  flat_a, flat_b = vit_lib.param_dict(ga), vit_lib.param_dict(gb)
  for name, g in flat_a.items():
    np.testing.assert_allclose(np.asarray(flat_b[name][...]), np.asarray(g[...]), atol=1e-5,
                               rtol=1e-4, err_msg=name)  # fmt: skip
  assert np.abs(np.asarray(flat_b['blocks.3.mlp.fc1.kernel'][...])).max() > 0
