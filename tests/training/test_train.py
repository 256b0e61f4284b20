"""Training and evaluation on the embedded digits with a tiny ViT: numbers, sharding, resume."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf
from flax import nnx
from tensorboard.backend.event_processing import event_accumulator

import convert.__main__ as convert_cli
from ats_jax.data import device_images, input_pipeline
from ats_jax.data.labels import Labels
from ats_jax.models import vit
from ats_jax.training import checkpointing, optim, sharding, train
from configs import digits_ats
from tests.helpers import ENV, TINY_FLAGS, tiny_config
from tests.references import random_timm_model, save_checkpoint

DIGITS = Labels(10, input_pipeline.DIGITS_CLASSES)  # a digits model's outputs


@pytest.mark.parametrize('mixing', [False, True], ids=['smoothing', 'mixup_cutmix_smoothing'])
def test_train_step_lowers_the_loss_on_a_fixed_batch(mixing):
  config = tiny_config(drop_path=0.0)  # a fixed batch, fitted: no stochastic depth
  config.aug.mixup, config.aug.cutmix = (0.8, 1.0) if mixing else (0.0, 0.0)
  model = train.build_model(config, num_classes=10)
  graphdef, params = nnx.split(model)
  schedule = optax.constant_schedule(3e-3)
  tx = optim.create_optimizer(config, schedule)
  state = train.create_train_state(params, tx, ema=False)
  batch = next(input_pipeline.train_batches(config, image_size=16))
  step = jax.jit(
    lambda s, b: train.train_step(
      s, b, graphdef=graphdef, tx=tx, schedule=schedule, config=config, num_classes=10
    )
  )
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 30
  if mixing:  # targets change every step and cap how low the loss can go
    assert np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5]), losses
  else:
    assert losses[-1] < 0.7 * losses[0] and np.all(np.diff(losses[:10]) < 0), losses


def test_a_distilled_model_trains_both_heads_on_the_labels():
  """No teacher: the loss is the cross-entropy of the two heads' averaged logits (what evaluation
  reads), so both heads get the same gradient at their output: equal bias gradients."""
  config = tiny_config(model='deit_tiny_distilled_patch16_224', ats_blocks=())
  graphdef, params = nnx.split(train.build_model(config, num_classes=10))
  batch = next(input_pipeline.train_batches(config, image_size=16))
  targets = jax.nn.one_hot(batch['label'], 10)

  def loss(p):
    return train.loss_and_stats(p, graphdef, batch['image'], targets)[0]

  grads = jax.jit(jax.grad(loss))(params)
  head, head_dist = (np.asarray(grads[name]['bias'][...]) for name in ('head', 'head_dist'))
  assert np.abs(head).max() > 1e-3
  np.testing.assert_allclose(head_dist, head, rtol=1e-6)
  kernels = [np.asarray(grads[name]['kernel'][...]) for name in ('head', 'head_dist')]
  assert all(np.abs(k).max() > 1e-3 for k in kernels)


def test_evaluation_counts_every_example_once_with_a_partial_last_batch():
  config = tiny_config(eval_batch_size=64)  # 360 = 5 x 64 + 40
  model = train.build_model(config, num_classes=10)
  model.eval()
  graphdef, params = nnx.split(model)
  mesh = sharding.make_mesh()
  result = train.evaluate(config, graphdef, params, mesh, 16, (1,), DIGITS, 'ats')
  logits, labels, kept = [], [], []  # the same by hand, batch by batch, dropping the padding
  for batch in input_pipeline.eval_batches(config, image_size=16):
    out, stats = model(device_images.normalize(batch['image']), return_stats=True)
    logits.append(np.asarray(out)[batch['mask']])
    labels.append(batch['label'][batch['mask']])
    kept.append(np.asarray(stats['kept_tokens'])[batch['mask'], 1])
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  assert result['examples'] == len(labels) == 360
  assert result['top1'] == pytest.approx(np.mean(logits.argmax(-1) == labels))
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  assert result['top5'] == pytest.approx(np.mean((top5 == labels[:, None]).any(-1)))
  assert result['kept_tokens'] == {1: pytest.approx(np.concatenate(kept).mean(), abs=0.01)}


def run_main(workdir, *overrides: str, devices: int = 1) -> subprocess.Popen:
  """main.py training the tiny config in a subprocess with `devices` simulated CPU devices."""
  args = [*TINY_FLAGS, *overrides]
  env = ENV | {'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  return subprocess.Popen(
    [sys.executable, 'main.py', '--config=configs/digits_ats.py', f'--workdir={workdir}', *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )


def finish(proc: subprocess.Popen) -> tuple[str, str]:
  """stdout and stderr of a run that must succeed."""
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return out, err


def losses(workdir) -> list[float]:
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={'tensors': 0})
  acc.Reload()
  if 'train/loss' not in acc.Tags()['tensors']:
    return []
  return [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors('train/loss')]


def final_params(config, workdir):
  params = nnx.split(nnx.eval_shape(lambda: train.build_model(config, num_classes=10)))[1]
  return jax.tree.map(
    np.asarray, train.restore_params(config, train.open_run(config, str(workdir)), params)
  )


def test_eight_devices_train_as_one_replicated_or_fsdp(tmp_path):
  runs = {
    'one': run_main(tmp_path / 'one'),
    'eight': run_main(tmp_path / 'eight', devices=8),
    'fsdp': run_main(tmp_path / 'fsdp', '--config.fsdp=True', devices=8),
  }
  outs = {name: finish(proc)[0] for name, proc in runs.items()}
  assert all('| ats |' in out and '| dense |' in out for out in outs.values())
  reference = losses(tmp_path / 'one')
  assert len(reference) == 6 and reference[0] > reference[-1]
  params = final_params(tiny_config(), tmp_path / 'one')
  for name in ('eight', 'fsdp'):
    np.testing.assert_allclose(losses(tmp_path / name), reference, rtol=1e-5, err_msg=name)
    jax.tree.map(  # 8 devices pack 4 images each: float32 sums in another order
      lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5),
      params,
      final_params(tiny_config(), tmp_path / name),
    )


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_parameters(tmp_path):
  finish(run_main(tmp_path / 'whole'))  # checkpoints at steps 2, 4, 6
  shutil.copytree(tmp_path / 'whole', tmp_path / 'killed')
  ckpts = tmp_path / 'killed' / 'checkpoints'
  for step in ('4', '6'):  # as if killed during step 5, mid-way through writing step 4's save
    shutil.rmtree(ckpts / step)
  (ckpts / '4.orbax-checkpoint-tmp-1').mkdir()
  os.remove(tmp_path / 'killed' / 'eval_results.json')
  finish(run_main(tmp_path / 'killed'))
  whole, resumed = (
    final_params(tiny_config(), tmp_path / 'whole'),
    final_params(tiny_config(), tmp_path / 'killed'),
  )
  jax.tree.map(np.testing.assert_array_equal, whole, resumed)
  expected = json.loads((tmp_path / 'whole' / 'eval_results.json').read_text())
  assert (
    json.loads((tmp_path / 'killed' / 'eval_results.json').read_text())['ats']['top1']
    == (expected['ats']['top1'])
  )
  # mode=evaluate on the run's workdir reads its latest state: the same numbers again
  os.remove(tmp_path / 'killed' / 'eval_results.json')
  finish(run_main(tmp_path / 'killed', '--config.mode=evaluate'))
  again = json.loads((tmp_path / 'killed' / 'eval_results.json').read_text())
  for name in ('ats', 'dense'):
    assert {k: v for k, v in again[name].items() if k != 'images_per_sec'} == {
      k: v for k, v in expected[name].items() if k != 'images_per_sec'
    }


def restore_state(config, workdir, step: int) -> train.TrainState:
  """The whole train state saved at `step`, on the host."""
  params = nnx.split(nnx.eval_shape(lambda: train.build_model(config, num_classes=10)))[1]
  tx = optim.create_optimizer(config, optax.constant_schedule(0.0))
  abstract = jax.eval_shape(lambda p: train.create_train_state(p, tx, config.ema_decay > 0), params)
  ckpt = train.checkpointing.Checkpointer(workdir / 'checkpoints', 10)
  state = ckpt.restore(train.with_shardings(abstract, sharding.make_mesh(), False), step)
  ckpt.close()
  return jax.tree.map(np.asarray, state)


def test_ema_trains_resumes_and_is_what_evaluation_reads(tmp_path):
  """--config.ema_decay: every step's EMA by hand, resume, and evaluation of the EMA, not params."""
  config = tiny_config(ema_decay=0.99, num_steps=4, checkpoint_every_steps=1)
  flags = ('--config.ema_decay=0.99', '--config.num_steps=4', '--config.checkpoint_every_steps=1')
  finish(run_main(tmp_path / 'whole', *flags))
  ema = nnx.state(train.build_model(config, num_classes=10))  # step 0: the initial weights
  ema = jax.tree.map(lambda x: np.asarray(x, np.float64), ema)
  for step in range(1, 5):
    state = restore_state(config, tmp_path / 'whole', step)
    ema = jax.tree.map(lambda e, p: 0.99 * e + 0.01 * p, ema, state.params)
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), state.ema_params, ema
    )
  moved = jax.tree.leaves(jax.tree.map(lambda p, e: np.abs(p - e).max(), state.params, ema))
  assert max(moved) > 5e-4  # the EMA lags the weights: evaluating one is not the other

  # Killed after step 2: the rerun ends where the whole run did, EMA included.
  shutil.copytree(tmp_path / 'whole', tmp_path / 'killed')
  for step in ('3', '4'):
    shutil.rmtree(tmp_path / 'killed' / 'checkpoints' / step)
  os.remove(tmp_path / 'killed' / 'eval_results.json')
  finish(run_main(tmp_path / 'killed', *flags))
  jax.tree.map(np.testing.assert_array_equal, restore_state(config, tmp_path / 'killed', 4), state)

  # Training's evaluation and mode=evaluate's weights are the EMA.
  jax.tree.map(
    np.testing.assert_array_equal, final_params(config, tmp_path / 'killed'), state.ema_params
  )
  graphdef = nnx.split(train.build_model(config, num_classes=10))[0]

  def evaluate(params) -> dict:
    mesh = sharding.make_mesh()
    result = train.evaluate(config, graphdef, params, mesh, 16, (1,), DIGITS, 'ats')
    return {k: v for k, v in result.items() if k != 'images_per_sec'}

  reported = json.loads((tmp_path / 'killed' / 'eval_results.json').read_text())['ats']
  reported = {k: v for k, v in reported.items() if k != 'images_per_sec'}
  reported['kept_tokens'] = {int(k): v for k, v in reported['kept_tokens'].items()}
  assert reported == evaluate(state.ema_params)
  assert reported != evaluate(state.params)


def test_sigterm_saves_a_restorable_checkpoint_and_exits(tmp_path):
  proc = run_main(tmp_path, '--config.num_steps=100000', '--config.checkpoint_every_steps=100000')
  try:
    deadline = time.time() + 120
    while not list(tmp_path.glob('events.out.tfevents*')) or not losses(tmp_path):
      assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
      time.sleep(0.5)
  except BaseException:
    proc.kill()  # leave nothing running when the test fails
    raise
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == checkpointing.EXIT_SAVED, err[-3000:]
  assert '| ats |' not in out and 'rerun the same command to resume' in err  # no evaluation
  config = tiny_config()
  ckpt = train.checkpointing.Checkpointer(tmp_path / 'checkpoints', 10)
  step = ckpt.latest_step()
  ckpt.close()
  assert step is not None and 0 < step < 100000
  params = final_params(config, tmp_path)
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def test_a_sigterm_is_noticed_even_where_a_log_line_would_raise(monkeypatch):
  """The handler runs wherever the main thread is. Inside a write to stderr that the signal
  interrupted, a log line of its own raised ('reentrant call') and the notice was lost."""

  def reentrant(*args, **kwargs):
    raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")

  previous = signal.getsignal(signal.SIGTERM)
  with checkpointing.Preemption() as preemption:
    with monkeypatch.context() as patch:
      patch.setattr(checkpointing.logging, 'warning', reentrant)
      signal.raise_signal(signal.SIGTERM)
    assert preemption.reached(1) == 'SIGTERM'
  assert signal.getsignal(signal.SIGTERM) is previous  # the loop's handlers end with the loop


@pytest.mark.parametrize('fmt', ['converted', 'deit_pth'])
def test_init_from_loads_pretrained_weights_and_reinitialises_another_head(tmp_path, fmt):
  """Fine-tuning an ImageNet DeiT-T (1000 classes) on digits: all but the head come from timm."""
  reference = random_timm_model('deit_tiny_patch16_224', seed=3)
  path = save_checkpoint(reference, tmp_path / 'w', 'deit_pth')
  if fmt == 'converted':
    assert convert_cli.main([path, str(tmp_path / 'ckpt'), '--model', 'deit_tiny_patch16_224']) == 0
    path = str(tmp_path / 'ckpt')
  config = digits_ats.get_config()
  config.model_overrides = {}
  fresh = train.build_model(config, num_classes=10)
  model = train.build_model(config, num_classes=10)
  train.init_from(model, path, 'deit_tiny_patch16_224')
  got = {k: np.asarray(v[...]) for k, v in vit.param_dict(model).items()}
  timm_sd = {k: v.numpy() for k, v in reference.state_dict().items()}
  np.testing.assert_array_equal(
    got['blocks.5.mlp.fc1.kernel'], timm_sd['blocks.5.mlp.fc1.weight'].T
  )
  np.testing.assert_array_equal(got['pos_embed'], timm_sd['pos_embed'])
  assert got['head.kernel'].shape == (192, 10)
  np.testing.assert_array_equal(got['head.kernel'], np.asarray(fresh.head.kernel[...]))


def test_a_batch_size_the_devices_do_not_divide_is_refused(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  with pytest.raises(ValueError, match='config.batch_size=36 is not divisible by the 8 devices'):
    train.check_batch_sizes(tiny_config(batch_size=36))
