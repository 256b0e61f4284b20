"""DeiT's optimiser from optax: AdamW, cosine schedule after linear warm-up, clipping, EMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

WARMUP_LR = 1e-6  # DeiT's warm-up starts here
NO_WEIGHT_DECAY = ('pos_embed', 'cls_token', 'dist_token')  # timm's `no_weight_decay()`


def learning_rate(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int):
  """lr = base_lr * batch / 512 (DeiT's scaling), linear warm-up, then cosine decay to min_lr."""
  peak = config.base_lr * config.batch_size / 512
  if peak < config.min_lr:
    logging.warning(
      'the peak learning rate base_lr * batch_size / 512 = %.3g * %d / 512 = %.3g is below '
      "min_lr %.3g, so the cosine schedule would rise to min_lr instead of decaying (DeiT's "
      'recipe does the same); set --config.min_lr below %.3g, e.g. %.3g, or raise base_lr',
      config.base_lr,
      config.batch_size,
      peak,
      config.min_lr,
      peak,
      peak / 10,
    )
  warmup = min(int(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=WARMUP_LR,
    peak_value=peak,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=config.min_lr,
  )


def decay_mask(params):
  """True where weight decay applies: matrices and kernels, not norms, biases, tokens, pos_embed."""

  def decays(path, leaf) -> bool:
    names = {str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)}
    return leaf.ndim > 1 and not names & set(NO_WEIGHT_DECAY)

  return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
  """AdamW as DeiT (betas 0.9/0.999, eps 1e-8), decay masked, global-norm clipping when set."""
  adamw = optax.adamw(
    schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay, mask=decay_mask
  )
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
  return adamw


def ema_update(ema, params, decay: float):
  """One step of the exponential moving average of the weights (timm's ModelEmaV2)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)
