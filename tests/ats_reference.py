"""An independent NumPy (float64) implementation of `docs/ats_spec.md`, one image at a time.

Written from the spec's prose with plain loops and Python sets, sharing nothing with `ats_jax`.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def layer_norm(x, scale, bias):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def gelu(x):
  from scipy.special import erf

  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def masked_softmax(logits, m):
  """Spec 'Masked attention' step 3 for the image alone: logits [H, Q, N], m [N].

  Alone (batch size 1) the original has no padded keys: its row max, its `exp` and `eps / N` see
  only the image's own m.sum() tokens, so padded slots here weigh 0 and never reach `exp`.
  """
  real = m > 0
  e = np.zeros_like(logits)
  e[..., real] = np.exp(logits[..., real] - logits[..., real].max(-1, keepdims=True))
  return np.where(real, e + EPS / real.sum(), 0.0) / (e.sum(-1, keepdims=True) + EPS)


def sample(scores, real, grid_size, max_kept):
  """Steps 2-6 for one image: image-token scores [M], real [M] bool -> kept image-token indices."""
  real_idx = [j for j in range(len(scores)) if real[j]]
  order = sorted(range(len(real_idx)), key=lambda i: scores[real_idx[i]])  # stable ascending
  sorted_scores = np.array([scores[real_idx[i]] for i in order])
  c = np.cumsum(sorted_scores)
  c = (c - c.min()) / (c.max() - c.min())
  y0 = min(v for v in c if v > 0)
  picks = set()
  for k in range(grid_size):
    y = y0 + k * (1 - y0) / (grid_size - 1)
    picks.add(int(np.argmin(np.abs(y - c))))
  kept = sorted(picks)[-max_kept:]  # ascending score; the highest when the cap binds
  return [real_idx[order[i]] for i in kept]


def attention(p, x, m, num_heads, masked):
  """qkv and the softmax of one block for one image: x [N, C], m [N] -> attn [H, N, N], v [N, H, d].

  ATS blocks zero the q, k, v of masked tokens; every block after the first ATS block uses the
  masked softmax (spec, 'Masked attention').
  """
  n, c = x.shape
  h = layer_norm(x, p['norm1.scale'], p['norm1.bias'])
  qkv = (h @ p['attn.qkv.kernel'] + p['attn.qkv.bias']).reshape(n, 3, num_heads, c // num_heads)
  q, k, v = (qkv[:, i] * (m[:, None, None] if masked else 1.0) for i in range(3))
  logits = np.einsum('qhd,khd->hqk', q, k) * (c // num_heads) ** -0.5
  if m is None:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True), v
  return masked_softmax(logits, m), v


def mlp_residual(p, y):
  hidden = gelu(
    layer_norm(y, p['norm2.scale'], p['norm2.bias']) @ p['mlp.fc1.kernel'] + p['mlp.fc1.bias']
  )
  return y + hidden @ p['mlp.fc2.kernel'] + p['mlp.fc2.bias']


def plain_block(p, x, m, num_heads):
  """A block without sampling for one image; m None before the first ATS block."""
  attn, v = attention(p, x, m, num_heads, masked=False)
  keep = 1.0 if m is None else m[:, None]
  out = np.einsum('hqk,khd->qhd', attn, v).reshape(x.shape)
  y = (x + out @ p['attn.proj.kernel'] + p['attn.proj.bias']) * keep
  return mlp_residual(p, y) * keep


def ats_block(p, x, m, num_heads, cap, num_prefix, grid_size):
  """One ATS block for one image. p: dict of float64 params by timm-like dotted names.

  x [N, C], m [N] -> x [cap, C], mask [cap], kept token indices (into the N input tokens).
  """
  n, c = x.shape
  attn, v = attention(p, x, m, num_heads, masked=True)  # [H, N, N], [N, H, d]
  v_norm = np.linalg.norm(v.reshape(n, c), axis=-1)
  scores = attn[:, 0, :].sum(0) * v_norm
  scores = scores[num_prefix:] / scores[num_prefix:].sum()
  picked = sample(scores, m[num_prefix:] > 0, grid_size, cap - num_prefix)
  rows = list(range(num_prefix)) + [num_prefix + j for j in picked]
  out = np.einsum('hqk,khd->qhd', attn[:, rows], v).reshape(len(rows), c)
  y = mlp_residual(p, x[rows] + out @ p['attn.proj.kernel'] + p['attn.proj.bias'])
  x_out, mask = np.zeros((cap, c)), np.zeros(cap)
  x_out[: len(rows)], mask[: len(rows)] = y, 1
  return x_out, mask, rows


def model_logits(params, tokens, num_heads, caps, num_prefix):
  """Blocks, final norm and head for one image alone, as the original runs it at batch size 1:
  no padded token ever. tokens [N0, C] (embedded); caps {block: K}.

  Returns the logits and the kept token count of every block.
  """
  x, m, kept = tokens, None, []
  depth = 1 + max(int(k.split('.')[1]) for k in params if k.startswith('blocks.'))
  for i in range(depth):
    p = {k.split('.', 2)[2]: v for k, v in params.items() if k.startswith(f'blocks.{i}.')}
    if i in caps:  # then cut to the kept tokens, as the original does for an image alone
      m = np.ones(len(x)) if m is None else m
      x, m, _ = ats_block(p, x, m, num_heads, caps[i], num_prefix, len(tokens) - num_prefix)
      x, m = x[m > 0], m[m > 0]
    else:
      x = plain_block(p, x, m, num_heads)
    kept.append(len(x) if m is None else int(m.sum()))
  x = layer_norm(x, params['norm.scale'], params['norm.bias'])
  logits = x[0] @ params['head.kernel'] + params['head.bias']
  if num_prefix == 2:
    logits = (logits + x[1] @ params['head_dist.kernel'] + params['head_dist.bias']) / 2
  return logits, kept
