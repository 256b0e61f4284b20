"""The token pictures and the accuracy-vs-compute sweep, run as a user runs them on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from matplotlib import image as mpimg

from ats_jax.models import CheckpointError, create_model, flops, vit
from configs import digits_ats
from experiments import accuracy_vs_compute, visualize_tokens
from tests import ats_reference
from tests.helpers import ENV

# The demo's config, shrunk: 16 px, 16 patches + cls, 3 blocks, ATS in blocks 1 and 2 (cap 17).
TINY = (
  '--config=configs/digits_ats.py',
  '--config.demo_speed=False',
  '--config.num_steps=30',
  '--config.model_overrides.img_size=16',
  '--config.model_overrides.embed_dim=32',
  '--config.model_overrides.depth=3',
  '--config.model_overrides.num_heads=2',
  '--config.ats_blocks=(1,2)',
  '--config.num_tokens=(17.,)',
  '--config.batch_size=32',
  '--config.eval_batch_size=120',
)
# Compiling dominates these tiny runs; every process (training too) compiles alike (ENV), so the
# numbers the tests compare are still identical.


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, check=False, env=ENV
  )


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny model trained for 30 steps by main.py; its eval_results.json is the reference."""
  path = tmp_path_factory.mktemp('tiny')
  proc = run('main.py', *TINY, f'--workdir={path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return path


def reference_kept_ids(model, tokens: np.ndarray) -> list[set[int]]:
  """Per ATS block the original tokens one image keeps, by the independent float64 reference."""
  x, m, ids, kept = tokens, None, np.arange(len(tokens)), []
  for block in model.blocks:
    p = {k: np.asarray(v[...], np.float64) for k, v in vit.param_dict(block).items()}
    heads = block.attn.num_heads
    if block.sampling is None:
      x = ats_reference.plain_block(p, x, m, heads)
      continue
    m = np.ones(len(x)) if m is None else m
    grid = block.sampling.grid_size
    x, m, rows = ats_reference.ats_block(p, x, m, heads, block.sampling.cap, 1, grid)
    x, m, ids = x[m > 0], m[m > 0], ids[rows]
    kept.append(set(ids.tolist()))
  return kept


def test_kept_token_ids_match_the_kept_counts_and_the_reference():
  model = create_model(
    'deit_tiny_patch16_224', img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
    num_classes=10, ats_blocks=(1, 2), num_tokens=(13, 0.7),
  )  # fmt: skip
  for block in model.blocks:  # sharp attention, as trained weights: ATS then drops tokens
    block.attn.qkv.kernel[...] = block.attn.qkv.kernel[...].at[:, :64].multiply(16.0)
  images = jax.random.normal(jax.random.key(0), (5, 16, 16, 3))
  _, stats = jax.device_get(model(images, return_stats=True))
  kept_ids = stats['kept_ids']
  counts = np.stack([(ids >= 0).sum(-1) for ids in kept_ids], axis=1)
  np.testing.assert_array_equal(counts, stats['kept_tokens'][:, 1:])
  assert counts.max() <= 13 and counts[:, 1].max() <= 9 and counts.min() >= 2  # caps 13, 0.7 x 13
  assert len(np.unique(counts[:, 0])) > 1  # adaptive: each image keeps its own count
  tokens = np.asarray(model.embed(images), np.float64)  # [B, 17, C]
  for r in range(len(images)):
    reference = reference_kept_ids(model, tokens[r])
    assert [set(ids[r].tolist()) - {-1} for ids in kept_ids] == reference, r
    assert 0 in reference[1] and reference[1] <= reference[0]  # cls always kept; subsets shrink
  keep = visualize_tokens.patch_keep_map(np.array([0, 1, 6, 16, -1]), 1, 4)
  assert keep.sum() == 3 and keep[0, 0] and keep[1, 1] and keep[3, 3]


def test_visualize_tokens_draws_the_kept_patches(workdir, tmp_path):
  out = tmp_path / 'png'
  proc = run(
    '-m', 'experiments.visualize_tokens', *TINY, f'--workdir={workdir}', f'--out={out}',
    '--name=digits', '--num_images=4', f'--json={tmp_path / "t.json"}',
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / 't.json').read_text())
  assert result['ats_blocks'] == [1, 2] and len(result['images']) == 4
  for counts, ids in zip(result['kept_tokens'], result['kept_token_ids'], strict=True):
    assert counts == [len(i) for i in ids] and set(ids[1]) <= set(ids[0])
  side = round(visualize_tokens.PANEL_INCHES * visualize_tokens.DPI)
  assert mpimg.imread(out / 'digits.png').shape[:2] == (4 * side, 3 * side)
  assert f'| {result["images"][0]} | {" | ".join(map(str, result["kept_tokens"][0]))} |' in (
    proc.stdout
  )


def test_accuracy_vs_compute_rows_agree_with_training(workdir, tmp_path):
  proc = run(
    '-m', 'experiments.accuracy_vs_compute', *TINY, f'--workdir={workdir}',
    f'--out={tmp_path / "acc.png"}', f'--json={tmp_path / "acc.json"}',
    '--settings=1,2:17;1-2:0.5',  # the dense reference comes first unasked
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / 'acc.json').read_text())
  rows = {r['setting']: r for r in result['rows']}
  assert list(rows) == ['dense', 'ATS 1-2 K=17', 'ATS 1-2 K=0.5']
  spec = create_model(
    'deit_tiny_patch16_224', img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
    num_classes=10,
  ).spec  # fmt: skip
  dense = flops.dense_gflops(spec)
  assert result['dense_gflops'] == dense
  assert rows['dense']['gflops'] == pytest.approx(dense, rel=1e-6)
  assert all(r['gflops'] <= dense * (1 + 1e-6) for r in rows.values())
  assert all(k <= 8 for k in rows['ATS 1-2 K=0.5']['kept_tokens'].values())  # 0.5 x 17 -> 8, 8
  trained = json.loads((workdir / 'eval_results.json').read_text())
  assert rows['dense']['top1'] == trained['dense']['top1']
  assert rows['ATS 1-2 K=17']['top1'] == trained['ats']['top1']
  assert all(r['examples'] == 360 for r in rows.values())
  assert f'| dense | {100 * trained["dense"]["top1"]:.2f} |' in proc.stdout
  assert mpimg.imread(tmp_path / 'acc.png').shape[:2] == (480, 640)


def test_settings_parse_and_defaults_follow_the_depth():
  parse = accuracy_vs_compute.parse_settings
  assert parse('dense; 1-3:37;2,3:28,21') == [
    ((), ()),
    ((1, 2, 3), (37.0,)),
    ((2, 3), (28.0, 21.0)),
  ]
  for bad in ('1,2', 'x:37', '1:'):
    with pytest.raises(ValueError, match=f"setting '{bad}' is not 'dense' or BLOCKS:CAPS"):
      parse(bad)
  config = ml_collections.ConfigDict(
    {'ats_blocks': (3, 4, 5, 6, 7, 8, 9, 10, 11), 'num_tokens': (197.0,)}
  )
  labels = [
    accuracy_vs_compute.label(s) for s in accuracy_vs_compute.default_settings(config, 12, 197)
  ]
  assert labels == [
    'dense', 'ATS 3-11 K=197', 'ATS 4-11 K=197', 'ATS 6-11 K=197', 'ATS 3 K=197',
    'ATS 3-11 K=0.75', 'ATS 3-11 K=0.5', 'ATS 3-11 K=0.25',
  ]  # fmt: skip


def test_a_workdir_without_checkpoint_or_a_missing_image_is_a_one_line_error(tmp_path):
  proc = run('-m', 'experiments.visualize_tokens', *TINY, f'--workdir={tmp_path}')
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: no checkpoint') or last.startswith('error: nothing to evaluate')
  assert 'make demo' in last, proc.stderr
  config = digits_ats.get_config()  # the same errors reach accuracy_vs_compute's main
  with pytest.raises(CheckpointError, match='make demo'):
    accuracy_vs_compute.run(config, str(tmp_path), None, None, str(tmp_path / 'a.png'))
  with pytest.raises(FileNotFoundError, match='no such image file: nope.png'):
    visualize_tokens.run(config, str(tmp_path), None, ['nope.png'], 1, str(tmp_path / 'v.png'))
  assert not list(tmp_path.iterdir())
