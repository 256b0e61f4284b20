"""The experiment scripts as a user runs them: their files exist and their numbers agree."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import timm

from ats_jax.models import flops, get_spec
from experiments import photos


def run_module(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  proc = subprocess.run(
    [sys.executable, '-m', module, *args],
    capture_output=True,
    text=True,
    check=False,
    env={'JAX_PLATFORMS': 'cpu', 'PATH': '', 'TF_CPP_MIN_LOG_LEVEL': '3', **env},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_token_stats_reports_fewer_tokens_for_peaked_attention(tmp_path):
  name = 'deit_tiny_patch16_224'
  proc = run_module(
    'experiments.token_stats', f'--model={name}', '--images=3', f'--json={tmp_path / "s.json"}'
  )
  result = json.loads((tmp_path / 's.json').read_text())
  assert result['dense_gflops'] == flops.dense_gflops(get_spec(name))
  random, peaked = result['rows'].values()
  for row in (random, peaked):
    kept = row['kept_tokens']
    assert kept[:3] == [197, 197, 197] and (np.diff(kept) <= 0).all()
    assert f'{row["gflops"]:.2f} |' in proc.stdout
  assert peaked['gflops'] < random['gflops'] < result['dense_gflops']


def test_benchmark_rows_and_their_numbers_agree(tmp_path):
  name = 'deit_tiny_patch16_224'
  proc = run_module(
    'experiments.benchmark',
    f'--models={name}',
    '--batch_sizes=1',
    '--repeats=1',
    '--peak=4',
    '--ceiling',
    f'--json={tmp_path / "b.json"}',
    JAX_DISABLE_MOST_OPTIMIZATIONS='true',
  )  # timings are not asserted: compile fast
  rows = json.loads((tmp_path / 'b.json').read_text())['rows']
  impls = ['jax dense', 'jax ATS packed', 'jax static ceiling', 'jax ATS padded',
           'jax ATS budgeted', 'timm dense']  # fmt: skip
  assert [(r['batch'], r['impl']) for r in rows] == [(1, i) for i in impls]
  by = {r['impl']: r for r in rows}
  assert by['jax dense']['gflops'] == pytest.approx(flops.dense_gflops(get_spec(name)))
  assert by['jax dense']['kept_tokens'] == 197
  padded, packed = by['jax ATS padded'], by['jax ATS packed']
  assert packed['kept_tokens'] == padded['kept_tokens'] < 197  # same tokens, either way
  assert packed['gflops'] == pytest.approx(padded['gflops'])
  assert by['jax static ceiling']['gflops'] == packed['gflops']  # the same token counts
  budgeted = by['jax ATS budgeted']
  assert budgeted['kept_tokens'] == padded['kept_tokens'] and budgeted['reruns'] == 0
  assert budgeted['budgets'][:3] == [None] * 3  # dense blocks before the first ATS block
  assert all(b is None or b % 128 == 0 for b in budgeted['budgets'])  # Execution.budget_align
  assert 0 < budgeted['budget_use'] <= 1
  for r in rows:
    assert r['images_per_sec'] > 0 and r['ideal'] == pytest.approx(
      by['jax dense']['gflops'] / r['gflops']
    )
    assert r['efficiency'] == pytest.approx(r['speedup'] / r['ideal'])
    assert r['spread'] == 0  # one round: its median is its best
  assert proc.stdout.count(f'| {name} |') == len(rows)


def test_gpu_executions_rows_and_the_gpu_choices_change_no_number_on_a_cpu(tmp_path):
  """On a CPU, cuDNN's masked attention and the unrolled searches are not used: the variants that
  switch them off give the same logits and tokens, and packed keeps padded's."""
  run_module(
    'experiments.gpu_executions',
    '--model=deit_tiny_patch16_224',
    '--depth=4',
    '--plan=2:dense+padded, both off+padded+packed 8+budgeted',
    f'--json={tmp_path / "g.json"}',
    JAX_DISABLE_MOST_OPTIMIZATIONS='true',
  )
  rows = json.loads((tmp_path / 'g.json').read_text())['rows']
  impls = ['dense', 'padded, both off', 'padded', 'packed 8', 'budgeted', 'timm']
  assert [r['impl'] for r in rows] == impls
  assert rows[0]['speedup'] == 1 and rows[0]['kept_tokens'] == 197
  for row in rows[1:5]:
    assert row['vs'] == 'padded, both off' and row['kept_tokens'] < 197
    assert row['kept_equal'] == 1 and row['top1_agree'] == 1
  assert rows[2]['max_logit_diff'] == 0  # padded: the same computation, bit for bit
  assert rows[3]['max_logit_diff'] < 0.05  # packed: bfloat16 products of other shapes
  assert rows[4]['max_logit_diff'] < 0.05 and not rows[4]['overflow']
  assert all(r['ms'] > 0 for r in rows)


def test_photos_are_prepared_exactly_as_timm_prepares_them():
  from PIL import Image

  transform = timm.data.create_transform(224, crop_pct=0.875, interpolation='bicubic')
  for photo in photos.originals()[:4]:  # square, landscape, portrait-free sizes from 300 to 1411 px
    expected = transform(Image.fromarray(photo)).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(photos.eval_transform(photo, 224), expected, atol=1e-6)
  batch = photos.photos(24, size=32)
  assert batch.shape == (24, 32, 32, 3) and len({x.tobytes() for x in batch}) == 24


def test_device_check_runs_and_its_parity_lines_hold(tmp_path):
  """The accelerator check on this CPU at tiny sizes, so it cannot rot between GPU sessions."""
  fast = dict(JAX_DISABLE_MOST_OPTIMIZATIONS='true')
  proc = run_module('experiments.device_check', '--small', f'--out={tmp_path}', **fast)
  report = (tmp_path / 'benchmark_cpu.md').read_text()
  assert 'ATS packed vs padded: kept tokens equal: True' in report
  assert 'ATS budgeted vs padded: kept tokens equal: True' in report
  diff = float(report.split('dense vs timm (float32): max |logit diff| ')[1].split()[0])
  assert diff < 1e-4
  assert report.count('| deit_tiny_patch16_224 |') == 5  # dense, packed, padded, budgeted, timm
  assert 'train packed' in report and 'train padded' in report and 'wrote' in proc.stdout
  assert 'train budgeted' in report and 're-runs' in report
