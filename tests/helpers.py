"""What many tests share: a tiny ViT, weights that make attention sharp, a tiny training config.

No test module imports another one; they import this, `references.py` (the PyTorch side) and the
fixtures of `conftest.py`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ats_jax.models import create_model
from ats_jax.models import vit as vit_lib
from configs import digits_ats

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
# ATS in blocks 1-3 of TINY, with a fraction, then fixed counts: images keep different tokens.
TINY_ATS = dict(ats_blocks=(1, 2, 3), num_tokens=(0.9, 12, 10))
ENV = {  # subprocesses compile as the tests do (conftest)
  'JAX_PLATFORMS': 'cpu',
  'JAX_DISABLE_MOST_OPTIMIZATIONS': os.environ.get('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true'),
  'PATH': os.environ.get('PATH', ''),
  'TF_CPP_MIN_LOG_LEVEL': '3',
}


def perturb(model: nnx.Module, seed: int = 0, scale: float = 0.3) -> None:
  """Random LayerNorm/bias values and larger weights, so attention is not near-uniform."""
  rng = np.random.default_rng(seed)
  for param in vit_lib.param_dict(model).values():
    param[...] = param[...] + scale * rng.standard_normal(param.shape).astype(np.float32)


def sharp_model(execution='padded', **kwargs) -> vit_lib.VisionTransformer:
  """TINY with TINY_ATS and large weights (sharp attention), in eval mode, in `execution`."""
  model = vit_lib.VisionTransformer(
    **TINY | TINY_ATS | kwargs, execution=execution, rngs=nnx.Rngs(0)
  )
  model.eval()
  perturb(model, scale=0.5)
  return model


@nnx.jit
def forward(model, images):
  """Logits and stats."""
  return model(images, return_stats=True)


# The digits config on a 2-block, 17-token model: a training step compiles in seconds.
TINY_MODEL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
TINY_TRAINING = dict(
  ats_blocks=(1,),
  num_tokens=(17.0,),
  batch_size=32,
  eval_batch_size=32,
  num_steps=6,
  warmup_epochs=0.1,
  checkpoint_every_steps=2,
  keep_checkpoints=10,
  log_every_steps=1,
  drop_path=0.2,  # stochastic depth on: resume and sharding must reproduce its draws
  demo_speed=False,  # the demo's DeiT-S timing line: not the tests'
)
# The same config as main.py flags (with --config=configs/digits_ats.py).
TINY_FLAGS = [f'--config.model_overrides.{k}={v}' for k, v in TINY_MODEL.items()] + [
  f'--config.{k}={v}' for k, v in TINY_TRAINING.items()
]


def tiny_config(**changes):
  """The digits config on the tiny model (TINY_MODEL, TINY_TRAINING), then `changes`."""
  config = digits_ats.get_config()
  config.model_overrides.update(TINY_MODEL)
  for key, value in (TINY_TRAINING | changes).items():
    config[key] = value
  return config


def flax_logits(checkpoint, name: str, images: np.ndarray) -> np.ndarray:
  """Our model's eval logits for `name` loaded from `checkpoint` (a file or converted directory)."""
  model = create_model(name, checkpoint=checkpoint)
  model.eval()
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images)))


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
