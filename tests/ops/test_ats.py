"""The ATS layer against an independent NumPy implementation of the spec, and its properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ats_jax import backend
from ats_jax.models import create_model
from ats_jax.models import vit as vit_lib
from ats_jax.models.ats import Sampling, sampling_plan, token_cap
from ats_jax.ops import token_sampling
from tests import ats_reference
from tests.helpers import forward

# A small DeiT-like model that runs in seconds on a CPU: 32px, patch 8 -> 16 patches + cls.
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)


def block_params(block: vit_lib.Block, scale_qk: float = 1.0) -> dict[str, np.ndarray]:
  """The block's params as float64 NumPy; `scale_qk` sharpens attention (peaked scores)."""
  params = {k: np.asarray(v[...], np.float64) for k, v in vit_lib.param_dict(block).items()}
  dim = params['norm1.scale'].shape[0]
  params['attn.qkv.kernel'][:, : 2 * dim] *= scale_qk
  return params


def perturbed_block(dim: int, heads: int, seed: int, scale_qk: float, sampling: Sampling):
  """A block with random weights (LayerNorm too) set from `block_params`' float64 values."""
  block = vit_lib.Block(dim, heads, 4.0, sampling=sampling, dtype=jnp.float32, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for name, param in vit_lib.param_dict(block).items():
    noise = 0.3 if name.endswith(('scale', 'bias')) else 0.0
    param[...] = param[...] + noise * rng.standard_normal(param.shape).astype(np.float32)
  params = block_params(block, scale_qk)
  for name, param in vit_lib.param_dict(block).items():
    param[...] = jnp.asarray(params[name], jnp.float32)
  return block, params


@pytest.mark.parametrize('scale_qk', [1.0, 6.0], ids=['random', 'peaked'])
@pytest.mark.parametrize('num_prefix', [1, 2], ids=['cls', 'cls+dist'])
@pytest.mark.parametrize('cap', [65, 24], ids=['cap_not_binding', 'cap_binding'])
def test_ats_block_equals_numpy_reference(scale_qk, num_prefix, cap):
  n, dim, heads, grid = 64 + num_prefix, 48, 3, 64
  sampling = Sampling(cap=min(cap, n), num_prefix_tokens=num_prefix, grid_size=grid)
  block, params = perturbed_block(dim, heads, seed=1, scale_qk=scale_qk, sampling=sampling)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, n, dim)).astype(np.float32)
  mask = np.ones((4, n), np.float32)
  mask[1, -5:] = 0  # images 1 and 3 arrive with padded slots, as after an earlier ATS block
  mask[3, 40:] = 0
  x *= mask[..., None]

  got_x, got_mask, _ = jax.jit(lambda x, m: block(x, m))(x, mask)
  for i in range(4):
    ref_x, ref_mask, _ = ats_reference.ats_block(
      params, x[i].astype(np.float64), mask[i].astype(np.float64), heads, sampling.cap,
      num_prefix, grid,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got_mask[i]), ref_mask)
    # each output row carries its input token's residual, so equal rows mean equal kept tokens
    np.testing.assert_allclose(np.asarray(got_x[i]), ref_x, atol=2e-5, rtol=1e-5)
  if scale_qk > 1:  # peaked attention concentrates the scores: fewer distinct picks
    assert np.asarray(got_mask).sum(-1).min() < n - 10


_sample_tokens = jax.jit(token_sampling.sample_tokens, static_argnums=(2, 3))


def sampled(scores, real=None, grid=None, max_kept=None):
  scores = np.asarray(scores, np.float32)[None]
  real = np.ones_like(scores, bool) if real is None else np.asarray(real)[None]
  m = scores.shape[-1]
  idx, valid = _sample_tokens(jnp.asarray(scores), jnp.asarray(real), grid or m, max_kept or m)
  return np.asarray(idx[0])[np.asarray(valid[0])].tolist()


@pytest.mark.parametrize('kind', ['random', 'peaked'])
def test_sampling_equals_numpy_reference(kind):
  rng = np.random.default_rng(0)
  m = 196  # one shape, so one compilation; the real token count varies through `real`
  for trial in range(50):
    logits = rng.standard_normal(m) * (8.0 if kind == 'peaked' else 1.0)
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    real = rng.random(m) < rng.uniform(0.05, 1.0)
    real[:2] = True
    grid, max_kept = 196, int(rng.choice([5, 40, 196]))  # binding, sometimes binding, never
    masked = np.where(real, scores, 0.0)
    masked /= masked.sum()
    expected = ats_reference.sample(masked.astype(np.float32), real, grid, max_kept)
    assert sampled(masked, real, grid, max_kept) == expected, trial


def test_gpus_unrolled_searches_sample_the_same_tokens():
  """GPUs and budgeted execution take the binary searches unrolled, other backends as a loop
  (`ats_jax.backend.search_method`): the same picks, over images of every fill."""
  rng = np.random.default_rng(1)
  scores = np.exp(rng.standard_normal((64, 196)) * 6)
  real = rng.random((64, 196)) < rng.uniform(0.05, 1.0, (64, 1))
  real[:, :2] = True
  scores = np.where(real, scores, 0.0)
  scores = jnp.asarray(scores / scores.sum(-1, keepdims=True), jnp.float32)
  real = jnp.asarray(real)

  def sample(search):
    return jax.jit(lambda s, r: token_sampling.sample_tokens(s, r, 196, 60, search=search))

  def loops(search) -> int:  # while loops in the lowered program (XLA's own loops)
    return sample(search).lower(scores, real).as_text().count('stablehlo.while')

  assert loops('scan') > 0 and loops('scan_unrolled') == 0
  expected = sample('scan')(scores, real)
  got = sample('scan_unrolled')(scores, real)
  for a, b in zip(got, expected, strict=True):
    np.testing.assert_array_equal(a, b)
  assert backend.search_method('packed') == 'scan' and backend.search_method('budgeted') == (
    'scan_unrolled'
  )
  assert 5 < float(expected[1].sum(-1).mean()) < 60  # the cap binds for some images, not all


def test_uniform_scores_with_a_cap_that_does_not_bind_keep_all_but_the_lowest_ranked():
  # spec step 5: the lowest-ranked token (c = 0) is never picked; of tied scores the first is lowest
  assert sampled(np.full(196, 1 / 196)) == list(range(1, 196))


def test_all_mass_on_one_token_keeps_that_token():
  scores = np.zeros(50)
  scores[17] = 1.0
  assert sampled(scores) == [17]


def test_token_caps():
  assert token_cap(197, 197) == 197
  assert token_cap(0.5, 197) == 98  # ratio of N, rounded
  assert token_cap(2, 197) == 8  # never fewer than 8
  assert token_cap(300, 150) == 150  # never more than N
  plan = sampling_plan(12, 197, 1, ats_blocks=[3, 7], num_tokens=[0.5, 64])
  assert [s.cap if s else None for s in plan] == [None] * 3 + [98] + [None] * 3 + [64] + [None] * 4
  assert {s.grid_size for s in plan if s} == {196}
  broadcast = sampling_plan(12, 197, 1, ats_blocks=[3, 4], num_tokens=[0.5])
  assert [s.cap for s in broadcast if s] == [98, 49]  # each cap is a ratio of the tokens entering
  with pytest.raises(ValueError, match='must be distinct block indices in'):
    sampling_plan(12, 197, 1, ats_blocks=[12], num_tokens=197)
  with pytest.raises(ValueError, match='one per ATS block'):
    sampling_plan(12, 197, 1, ats_blocks=[3, 4], num_tokens=[100, 50, 20])


def tiny(**overrides):
  """TINY with short ladders (packed execution compiles a branch per size: tests stay quick)."""
  model = vit_lib.VisionTransformer(
    **TINY | dict(pack_chunks=2, attention_sizes=2) | overrides, rngs=nnx.Rngs(0)
  )
  model.eval()
  return model


def perturb(model: nnx.Module, seed: int = 0, scale: float = 0.3) -> None:
  """Random LayerNorm/bias values and larger weights, so attention is not near-uniform."""
  rng = np.random.default_rng(seed)
  for param in vit_lib.param_dict(model).values():
    param[...] = param[...] + scale * rng.standard_normal(param.shape).astype(np.float32)


@pytest.fixture
def tiny_images():
  return jnp.asarray(np.random.default_rng(0).standard_normal((6, 32, 32, 3)), jnp.float32)


@pytest.mark.parametrize('execution', ['padded', 'packed'])
@pytest.mark.parametrize('distilled', [False, True], ids=['deit', 'deit_distilled'])
def test_whole_model_equals_numpy_reference(tiny_images, distilled, execution):
  """Plain, ATS and masked plain blocks, norm and head(s), each image alone in float64.

  Large weights make padded keys' logits dominate rows: they must still change nothing.
  """
  caps = {1: 14, 2: 10}  # block 3: a plain block with a mask
  model = tiny(
    ats_blocks=tuple(caps),
    num_tokens=tuple(caps.values()),
    distilled=distilled,
    execution=execution,
    pack_chunks=4,
  )
  perturb(model, scale=0.6)
  logits, stats = run_ats(model, tiny_images)
  tokens = np.asarray(model.embed(tiny_images), np.float64)  # [B, N0, C]: the reference's input
  params = {k: np.asarray(v[...], np.float64) for k, v in vit_lib.param_dict(model).items()}
  for i in range(tiny_images.shape[0]):
    ref_logits, ref_kept = ats_reference.model_logits(
      params, tokens[i], TINY['num_heads'], caps, num_prefix=2 if distilled else 1
    )
    assert np.asarray(stats['kept_tokens'][i]).tolist() == ref_kept
    np.testing.assert_allclose(np.asarray(logits[i]), ref_logits, atol=1e-4, rtol=1e-4)
  assert len({tuple(k) for k in np.asarray(stats['kept_tokens']).tolist()}) > 1


def test_no_ats_blocks_is_the_dense_model_bit_for_bit(tiny_images):
  dense, ats = tiny(), tiny(ats_blocks=(), num_tokens=0.25)
  perturb(dense)
  perturb(ats)
  (a, stats), (b, _) = run_ats(dense, tiny_images), run_ats(ats, tiny_images)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(stats['kept_tokens']), 17)


def test_ats_model_has_the_dense_parameter_tree_and_loads_its_checkpoint(tmp_path):
  dense, ats = tiny(), tiny(ats_blocks=(1, 2, 3), num_tokens=[12, 0.8, 9])
  assert {k: v.shape for k, v in vit_lib.param_dict(dense).items()} == {
    k: v.shape for k, v in vit_lib.param_dict(ats).items()
  }


_forward_with_stats = nnx.jit(forward)  # one cache for every test


def run_ats(model, images):
  return _forward_with_stats(model, images)


def test_batch_independence(tiny_images):
  model = tiny(ats_blocks=(1, 2, 3), num_tokens=(0.9, 12, 10))
  perturb(model)
  logits, stats = run_ats(model, tiny_images)
  assert len(set(map(tuple, np.asarray(stats['kept_tokens']).tolist()))) > 1  # images differ
  for i in range(tiny_images.shape[0]):
    one_logits, one_stats = run_ats(model, tiny_images[i : i + 1])
    np.testing.assert_array_equal(one_stats['kept_tokens'][0], stats['kept_tokens'][i])
    np.testing.assert_allclose(one_logits[0], logits[i], rtol=1e-4, atol=1e-5)  # float32 noise


def test_padded_positions_do_not_influence_any_logit(tiny_images):
  """Garbage in the padded slots after an ATS block changes no logit of the rest of the network."""
  model = tiny(ats_blocks=(1, 2, 3), num_tokens=(0.9, 12, 10))
  perturb(model)

  @nnx.jit
  def tail_logits(model, images, garbage):
    x, mask, _ = model.blocks[0](model.embed(images))
    x, mask, _ = model.blocks[1](x, mask)
    x = x + garbage * (1 - mask)[..., None]  # fill only the padded slots
    for block in model.blocks[2:]:
      x, mask, _ = block(x, mask)
    return model.head_logits(x), mask

  zeros = jnp.zeros((6, 15, 48))
  garbage = 100 * jax.random.normal(jax.random.key(1), zeros.shape)
  clean, mask = tail_logits(model, tiny_images, zeros)
  dirty, _ = tail_logits(model, tiny_images, garbage)
  assert (np.asarray(mask) == 0).any()  # there are padded slots to fill
  np.testing.assert_array_equal(np.asarray(clean), np.asarray(dirty))


def test_jit_compiles_once_for_different_batches():
  model = tiny(ats_blocks=(1, 2), num_tokens=0.7)
  perturb(model)
  traces = []

  @nnx.jit
  def forward(model, images):
    traces.append(1)
    return model(images, return_stats=True)

  kept = set()
  for seed in range(4):
    images = jax.random.normal(jax.random.key(seed), (6, 32, 32, 3))
    kept.add(tuple(np.asarray(forward(model, images)[1]['kept_tokens']).ravel()))
  assert len(traces) == 1 and len(kept) == 4


def test_gradients_are_finite_and_reach_every_block(tiny_images):
  model = tiny(ats_blocks=(1, 2, 3), num_tokens=(0.9, 12, 10))
  perturb(model)
  model.train()
  labels = jnp.arange(6) % 10

  def loss_fn(model):
    logits = model(tiny_images)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

  grads = nnx.jit(nnx.grad(loss_fn))(model)
  flat = vit_lib.param_dict(grads)
  assert all(np.isfinite(np.asarray(g[...])).all() for g in flat.values())
  for i in range(4):  # gradients flow through the attention of the kept tokens in ATS blocks
    for name in ('attn.qkv.kernel', 'attn.proj.kernel', 'mlp.fc1.kernel'):
      assert np.abs(np.asarray(flat[f'blocks.{i}.{name}'][...])).max() > 0, (i, name)


def test_bfloat16_keeps_the_float32_predictions(tiny_images):
  """bf16 compute, f32 sampling math. Weights perturbed mildly: with large random weights the tiny
  model is chaotic and bf16 rounding swaps near-tied tokens, as it would for any discrete choice."""
  f32 = tiny(ats_blocks=(1, 2, 3), num_tokens=0.8)
  bf16 = tiny(ats_blocks=(1, 2, 3), num_tokens=0.8, dtype=jnp.bfloat16)
  perturb(f32, scale=0.1)
  perturb(bf16, scale=0.1)
  (a, sa), (b, sb) = run_ats(f32, tiny_images), run_ats(bf16, tiny_images)
  assert b.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(sb['kept_tokens']), np.asarray(sa['kept_tokens']))
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=0.03 * np.abs(np.asarray(a)).max())
  assert (np.asarray(b).argmax(-1) == np.asarray(a).argmax(-1)).all()


def test_stats_of_the_dense_model_are_the_published_gflops():
  model = create_model('deit_small_patch16_224')
  model.eval()
  images = jnp.zeros((2, 224, 224, 3))
  _, stats = nnx.jit(lambda m, x: m(x, return_stats=True))(model, images)
  np.testing.assert_array_equal(np.asarray(stats['kept_tokens']), 197)
  np.testing.assert_allclose(np.asarray(stats['gflops']), [4.599, 4.599], atol=1e-3)  # 4.6 quoted


def test_stats_count_the_kept_tokens(tiny_images):
  model = tiny(ats_blocks=(2,), num_tokens=9)
  perturb(model)
  _, stats = run_ats(model, tiny_images)
  kept = np.asarray(stats['kept_tokens'])
  assert (kept[:, :2] == 17).all() and (kept[:, 2] <= 9).all() and (kept[:, 3] == kept[:, 2]).all()
  # by hand: dim 48, mlp 192; block 2 keeps k of 17 tokens, block 3 runs on k
  dim, hidden, k = 48, 192, kept[:, 2].astype(np.float64)

  def block(keys, queries):
    return (
      3 * dim * dim * keys
      + dim * keys * keys
      + dim * queries * keys
      + dim * dim * queries
      + (2 * dim * hidden * queries)
    )

  expected = 16 * 3 * 64 * dim + dim * 10 + 2 * block(17, 17) + block(17, k) + block(k, k)
  np.testing.assert_allclose(np.asarray(stats['gflops']), expected / 1e9, rtol=1e-6)


def test_masked_softmax_ignores_padded_keys_of_any_size():
  """A padded key 1e4 above the row max would be exp(1e4) * 0 = NaN if it reached `exp`."""
  from ats_jax.ops.attention import SOFTMAX_EPS, masked_softmax

  logits = np.random.default_rng(0).standard_normal((2, 1, 3, 5)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  huge = logits.copy()
  huge[0, :, :, 3:] = 1e4
  got = np.asarray(masked_softmax(jnp.asarray(huge), jnp.asarray(mask)))
  real = logits[0, :, :, :3].astype(np.float64)
  e = np.exp(real - real.max(-1, keepdims=True))
  expected = (e + SOFTMAX_EPS / 3) / (e.sum(-1, keepdims=True) + SOFTMAX_EPS)
  np.testing.assert_allclose(got[0, :, :, :3], expected, rtol=1e-6)
  assert (got[0, :, :, 3:] == 0).all() and np.isfinite(got).all()


def test_inverse_transform_is_the_first_nearest_cdf_value_even_with_ties():
  """The binary searches against a brute-force argmin |y - c| (first on ties) over CDFs with
  repeated values (zero scores), grid points landing exactly on CDF values, and padding."""
  rng = np.random.default_rng(1)
  m = 40
  for trial in range(200):
    num_real = int(rng.integers(1, m + 1))
    scores = rng.random(num_real) * (rng.random(num_real) < 0.6)  # many zeros: repeated values
    scores = np.sort(np.round(scores, int(rng.integers(1, 4))))  # coarse: exact ties
    sorted_scores = np.zeros(m, np.float32)
    sorted_scores[:num_real] = scores
    cdf = token_sampling.normalized_cdf(jnp.asarray(sorted_scores)[None], jnp.asarray([num_real]))
    grid_size = int(rng.choice([2, 7, 40]))
    got = np.asarray(token_sampling.inverse_transform(cdf, grid_size))[0]
    c = np.asarray(cdf)[0]
    y0 = c[(c > 0) & np.isfinite(c)].min() if ((c > 0) & np.isfinite(c)).any() else 1.0
    grid = np.float32(y0) + np.arange(grid_size, dtype=np.float32) / np.float32(grid_size - 1) * (
      np.float32(1) - np.float32(y0)
    )
    expected = np.argmin(np.abs(grid[:, None] - c[None, :]), axis=-1)
    np.testing.assert_array_equal(got, expected, err_msg=f'trial {trial}')
