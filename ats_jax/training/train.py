"""Training and evaluation: pure `train_step`/`eval_step` and the loop around them.

The loop follows the Flax NNX examples: the model is split once into a static graph and its
parameters; the steps are plain functions of arrays, jitted with explicit shardings (data parallel
over every device of every host), the train state donated.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview
from etils import epath
from flax import nnx

from ats_jax import backend
from ats_jax.convert import pretrained
from ats_jax.data import device_images, input_pipeline, mixup
from ats_jax.data.labels import Labels
from ats_jax.errors import CheckpointError
from ats_jax.layout import Execution, budgets
from ats_jax.models import create_model, enable, vit
from ats_jax.models.factory import load_params
from ats_jax.training import checkpointing, optim, progress, sharding

HEADS = ('head', 'head_dist')  # re-initialised when fine-tuning to another class count
CLASSES_FILE = 'classes.txt'  # a training run's class names, one per line: its label space


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  ema_params: nnx.State | None  # None when config.ema_decay == 0

  @property
  def eval_params(self) -> nnx.State:
    """The weights to evaluate: the EMA when kept."""
    return self.params if self.ema_params is None else self.ema_params


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's `create_model` options: dtype, ATS, execution and architecture overrides."""
  return dict(
    dtype=backend.compute_dtype(config.dtype),
    ats_blocks=tuple(config.ats_blocks),
    num_tokens=tuple(config.num_tokens),
    execution=config.execution,
    pack_chunks=config.pack_chunks,
    attention_sizes=config.attention_sizes,
    budgets=tuple(config.budgets) or None,
    drop_path_rate=config.drop_path,
    **config.model_overrides,
  )


def build_model(config: ml_collections.ConfigDict, num_classes: int, **overrides) -> nnx.Module:
  """The configured model (random init), with the data's class count; `overrides` win."""
  kwargs = model_options(config) | dict(num_classes=num_classes)
  return create_model(config.model, seed=config.seed, **kwargs | overrides)


def abstract_model(config: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
  """`build_model` with shape-only parameters: nothing initialised or compiled, for weights that
  are restored or loaded anyway (a second start then compiles nothing)."""
  return nnx.eval_shape(lambda: build_model(config, num_classes))


def init_from(model: nnx.Module, path: str, name: str) -> None:
  """Loads pretrained weights of variant `name` for fine-tuning; a head of another class count is
  re-initialised, as timm does."""
  params = dict(pretrained.load_checkpoint(path, name).params)
  own = vit.param_dict(model)
  for key in [k for k in params if k.split('.')[0] in HEADS]:
    if key in own and tuple(own[key].shape) != tuple(params[key].shape):
      logging.info(
        'init_from: %s %s does not fit %s: re-initialised', key, params[key].shape, own[key].shape
      )
      params[key] = own[key][...]
  load_params(model, params, f'the model (init_from {path})')


def loss_and_stats(params, graphdef, images, targets, rng=None):
  """Cross-entropy on soft targets; `rng` drives stochastic depth (None: none)."""
  logits, stats = nnx.merge(graphdef, params)(images, return_stats=True, rng=rng)
  loss = optax.softmax_cross_entropy(logits, targets).mean()
  return loss, stats


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  config: ml_collections.ConfigDict,
  num_classes: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on a Mixup/CutMix'ed batch with label smoothing.

  `batch` is the input pipeline's: uint8 images, normalised here, and random erasing's boxes,
  filled here with noise drawn from (config.seed, step).
  """
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  images = device_images.normalize(batch['image'])  # [B, H, W, 3] float32
  erase_rng = jax.random.fold_in(jax.random.key(config.seed + 2), state.step)
  images = device_images.erase(images, batch['erase'], erase_rng)
  images, targets = mixup.mix(
    rng,
    images,
    batch['label'],
    num_classes,
    mixup_alpha=config.aug.mixup,
    cutmix_alpha=config.aug.cutmix,
    smoothing=config.aug.label_smoothing,
    num_groups=jax.process_count(),  # partners within each host's share, as timm's per GPU
  )
  grad_fn = jax.value_and_grad(loss_and_stats, has_aux=True)
  drop_rng = jax.random.fold_in(jax.random.key(config.seed + 1), state.step)  # stochastic depth
  (loss, stats), grads = grad_fn(state.params, graphdef, images, targets, drop_rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = optim.ema_update(ema, params, config.ema_decay)
  metrics = {
    'loss': loss,
    'learning_rate': schedule(state.step),
    'grad_norm': optax.tree.norm(grads),
    'gflops': stats['gflops'].mean(),
    'overflow': stats['overflow'],
    'stream_tokens': stats['stream_tokens'],
  }
  new = TrainState(state.step + 1, params, opt_state, ema)
  # a batch over its token budgets computed wrong numbers: keep the state, the runner re-runs it
  return jax.tree.map(lambda n, o: jnp.where(stats['overflow'], o, n), new, state), metrics


def eval_step(
  params: nnx.State,
  batch: dict[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  mean: tuple[float, ...],
  std: tuple[float, ...],
):
  """Sums over the batch's real examples (mask): metrics average right over padded batches.
  The uint8 images are normalised here with the eval data config's `mean` and `std`."""
  images = device_images.normalize(batch['image'], mean, std)  # [B, H, W, 3] float32
  logits, stats = nnx.merge(graphdef, params)(images, return_stats=True)
  mask = batch['mask'].astype(jnp.float32)  # [B]
  top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]  # [B, 5]
  hits = top == batch['label'][:, None]
  return {
    'overflow': stats['overflow'],
    'stream_tokens': stats['stream_tokens'],
    'count': mask.sum(),
    'top1': (hits[:, 0] * mask).sum(),
    'top5': (hits.any(-1) * mask).sum(),
    'kept_tokens': (stats['kept_tokens'] * mask[:, None]).sum(0),  # [depth]
    'gflops': (stats['gflops'] * mask).sum(),
  }


def evaluate(
  config: ml_collections.ConfigDict,
  graphdef: nnx.GraphDef,
  params: nnx.State,
  mesh: jax.sharding.Mesh,
  image_size: int,
  ats_blocks: tuple[int, ...],
  labels: Labels,
  name: str,
) -> dict[str, Any]:
  """One pass over the eval split, its classes scored as the outputs of the same name
  (`labels`): top-1/5, kept tokens per block, GFLOPs/image, images/s (compilation excluded; the
  input pipeline is not timed)."""
  data = input_pipeline.eval_data_config(config)
  runner = budget_runner(graphdef, params, mesh, config.eval_batch_size)
  mean, std = tuple(data.mean), tuple(data.std)

  def jitted(execution: Execution):
    return eval_step_fn(vit.with_execution(graphdef, params, execution), mesh, mean, std)

  step = progress.Compiled(jitted, f'the evaluation step ({name})')

  def call(execution, batch):
    with jax.set_mesh(mesh):  # token layouts lay out each device's own images
      return step(execution, params, batch)

  batches = input_pipeline.eval_batches(config, image_size=image_size, labels=labels)
  totals, seconds = None, 0.0
  for i, batch in enumerate(sharding.device_batches(batches, mesh)):
    start = time.perf_counter() - step.seconds
    sums = jax.device_get(runner.run(call, batch, report=_budget_report))
    seconds += time.perf_counter() - step.seconds - start  # re-runs count, compiles do not
    sums = {k: v for k, v in sums.items() if k not in BUDGET_STATS}
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    progress.eval_progress(name, i + 1, len(batches))
  count = float(totals['count'])
  kept = totals['kept_tokens'] / count
  return {
    'examples': int(count),
    'top1': float(totals['top1'] / count),
    'top5': float(totals['top5'] / count),
    'gflops': float(totals['gflops'] / count),
    'kept_tokens': {int(b): round(float(kept[b]), 2) for b in ats_blocks},
    'images_per_sec': len(batches) * config.eval_batch_size / seconds if seconds > 0 else None,
  } | budget_results(runner)


BUDGET_STATS = ('overflow', 'stream_tokens')  # what a budget runner reads, not metrics


def _budget_report(stats: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  return stats['overflow'], stats['stream_tokens']


def budget_runner(
  graphdef: nnx.GraphDef, params: nnx.State, mesh: jax.sharding.Mesh, batch_size: int
) -> budgets.BudgetRunner:
  """The runner that keeps a budgeted model's token budgets fitted to the batches
  (`ats_jax.layout.budgets`); it runs other executions as they are."""
  per_device = batch_size // mesh.shape[sharding.DATA_AXIS]
  return budgets.BudgetRunner.for_model(nnx.merge(graphdef, params), per_device)


def budget_results(runner: budgets.BudgetRunner) -> dict[str, Any]:
  """What a budgeted run reports beside its metrics: the final budgets, their use, the re-runs."""
  if not runner.active:
    return {}
  use = runner.use()
  return {
    'budgets': list(runner.budgets),
    'budget_use': None if math.isnan(use) else round(use, 4),  # None: no budgeted block
    'reruns': runner.reruns,
  }


@functools.cache
def eval_step_fn(
  graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, mean: tuple[float, ...], std: tuple[float, ...]
):
  """The jitted `eval_step`, built once per (architecture, mesh, normalisation): periodic
  evaluation reuses its compiled program instead of compiling it again."""
  step = functools.partial(eval_step, graphdef=graphdef, mean=mean, std=std)
  return jax.jit(step, out_shardings=sharding.replicated(mesh))


def create_train_state(
  params: nnx.State, tx: optax.GradientTransformation, ema: bool
) -> TrainState:
  """Step 0. The EMA starts equal to the weights but in its own buffers: each step donates the
  whole state, and XLA refuses to donate one buffer twice."""
  ema_params = jax.tree.map(jnp.copy, params) if ema else None
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), ema_params)


def with_shardings(tree, mesh: jax.sharding.Mesh, fsdp: bool):
  """Shape structs laid out on this run's devices: restoring re-shards whatever saved them."""
  shardings = sharding.param_sharding(tree, mesh, fsdp)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def dense_graphdef(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.GraphDef:
  """The same architecture without ATS (ATS adds no parameters): the reference the ATS model is
  compared with. Derived from `graphdef`, so no model is built or initialised again."""
  return nnx.split(enable.disable_ats(nnx.merge(graphdef, params)))[0]


def check_batch_sizes(config: ml_collections.ConfigDict) -> None:
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % jax.device_count():
      raise ValueError(
        f'config.{field}={config[field]} is not divisible by the {jax.device_count()} devices'
      )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Trains (resuming from the latest checkpoint in `workdir`), then evaluates.

  Returns the evaluation results, or None when SIGTERM stopped training (after saving).
  """
  check_batch_sizes(config)
  mesh = sharding.make_mesh()
  info = input_pipeline.dataset_info(config.data)
  model = build_model(config, info.num_classes)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  resume = ckpt.latest_step() is not None  # a finished run only evaluates again
  if resume:
    logging.info('Resuming from %s, step %d', workdir, ckpt.latest_step())
  if config.init_from and not resume:  # the checkpoint holds the fine-tuned weights
    init_from(model, config.init_from, config.model)
  graphdef, params = nnx.split(model)
  steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
  total = config.num_steps or math.ceil(config.num_epochs * steps_per_epoch)
  schedule = optim.learning_rate(config, total, steps_per_epoch)
  tx = optim.create_optimizer(config, schedule)
  state = create_train_state(params, tx, ema=config.ema_decay > 0)
  shardings = sharding.param_sharding(state, mesh, config.fsdp)
  if resume:
    state = ckpt.restore(with_shardings(state, mesh, config.fsdp))
  else:
    state = jax.device_put(state, shardings)
  start = int(state.step)
  # Imported here: clu's TensorBoard writer loads Keras, 3 s that evaluation need not wait for.
  from clu import metric_writers

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    log_parameters(params, workdir)
    writer.write_hparams(_flat_hparams(config))
    write_classes(info.class_names, workdir)
  runner = budget_runner(graphdef, params, mesh, config.batch_size)

  @functools.cache
  def step_fn(execution: Execution):
    step = functools.partial(
      train_step,
      graphdef=vit.with_execution(graphdef, params, execution),
      tx=tx,
      schedule=schedule,
      config=config,
      num_classes=info.num_classes,
    )
    return jax.jit(
      step,
      in_shardings=(shardings, sharding.data_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0,
    )

  step_program = progress.Compiled(step_fn, 'the training step')

  def call(execution, state, *, batch):
    with jax.set_mesh(mesh):  # token layouts lay out each device's own images
      return step_program(execution, state, batch)

  local = input_pipeline.train_batches(config, image_size=model.img_size, start_step=start)
  batches = sharding.device_batches(local, mesh)  # the next batches already on their way
  throughput = progress.Throughput(total)
  pending = []

  def evaluate_state(step: int) -> dict[str, Any]:
    results = evaluate_all(config, graphdef, state.eval_params, mesh, model.img_size, info.labels)
    write_results(results, workdir, writer, step)
    return results

  with checkpointing.Preemption() as preemption:  # from here a SIGTERM or Ctrl-C saves first
    logging.info('Training %d steps (%d per epoch) from step %d', total, steps_per_epoch, start)
    for step in range(start, total):
      batch = next(batches)
      compiles = step_program.compiles
      state, metrics = runner.run(
        functools.partial(call, batch=batch),
        state,
        report=lambda out: _budget_report(out[1]),
        carry_of=lambda out: out[0],
      )
      if step_program.compiles != compiles:  # steps/s counts from the last compile on
        throughput.begin(step)
      pending.append({k: v for k, v in metrics.items() if k not in BUDGET_STATS})
      done = step + 1
      if done % config.log_every_steps == 0 or done == total:
        means = jax.tree.map(lambda *v: float(np.mean(v)), *jax.device_get(pending))
        rate = throughput.at(done)  # the metrics are on the host: every step to `done` ran
        if rate is not None:
          means['steps_per_sec'] = rate
        writer.write_scalars(done, {f'train/{k}': v for k, v in means.items()})
        logging.info('%s', throughput.line(done))
        pending = []
      stop = preemption.reached(done)
      if done % config.checkpoint_every_steps == 0 or done == total or stop:
        ckpt.save(done, state)
      if stop:
        ckpt.close()
        writer.flush()
        logging.warning('Saved step %d after %s; rerun the same command to resume', done, stop)
        return None
      if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total:
        evaluate_state(done)
  ckpt.close()
  return evaluate_state(total)


def log_parameters(params: nnx.State, workdir: str) -> None:
  """One line: the parameter count; the per-array table goes to WORKDIR/parameters.txt."""
  pure = params.to_pure_dict()
  if jax.process_index() == 0:
    path = epath.Path(workdir) / 'parameters.txt'  # a local folder or gs://
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(parameter_overview.get_parameter_overview(pure) + '\n')
  count = parameter_overview.count_parameters(pure)
  table = os.path.join(workdir, 'parameters.txt')
  logging.info('Parameters: %s (table in %s)', f'{count:,}', table)


def evaluate_all(
  config: ml_collections.ConfigDict,
  graphdef: nnx.GraphDef,
  params: nnx.State,
  mesh: jax.sharding.Mesh,
  image_size: int,
  labels: Labels,
) -> dict[str, Any]:
  """The configured model, and with ATS on also the same weights run dense."""
  ats_blocks = tuple(config.ats_blocks)
  runs = {'ats' if ats_blocks else 'dense': (graphdef, ats_blocks)}
  if ats_blocks:
    runs['dense'] = (dense_graphdef(graphdef, params), ())
  return {
    name: evaluate(config, g, params, mesh, image_size, blocks, labels, name)
    for name, (g, blocks) in runs.items()
  }


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, Any]:
  """Evaluates `config.checkpoint` (converted or PyTorch weights), else `workdir`'s latest state.
  The weights decide the class count; the eval split's classes map onto theirs by name, so no
  train split is needed."""
  check_batch_sizes(config)
  mesh = sharding.make_mesh()
  if config.checkpoint:  # its LayerNorm eps and eval preprocessing, unless the config sets them
    loaded = pretrained.load_checkpoint(config.checkpoint, config.model)
    labels = Labels(loaded.num_classes, loaded.labels)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.checkpoint_data = loaded.data.to_json()
      if config.model_overrides.get('layer_norm_eps') is None:
        config.model_overrides.layer_norm_eps = loaded.layer_norm_eps
  else:
    ckpt = open_run(config, workdir)
    labels = run_labels(ckpt, workdir)
  model = abstract_model(config, labels.num_classes)
  graphdef, params = nnx.split(model)
  if config.checkpoint:
    load_params(model, dict(loaded.params), f'{config.model} (from {config.checkpoint})')
    params = nnx.state(model)
  else:
    params = restore_params(config, ckpt, params)
  params = jax.device_put(params, sharding.param_sharding(params, mesh, config.fsdp))
  results = evaluate_all(config, graphdef, params, mesh, model.img_size, labels)
  if workdir:
    write_results(results, workdir, None, None)
  return results


def open_run(config: ml_collections.ConfigDict, workdir: str | None) -> checkpointing.Checkpointer:
  """The checkpoints of the training run in `workdir`; one line if there are none."""
  ckpt_dir = os.path.join(workdir or '', 'checkpoints')
  if not workdir or not epath.Path(ckpt_dir).is_dir():
    raise CheckpointError(
      f'nothing to evaluate: set config.checkpoint, or --workdir to a training run (no {ckpt_dir})'
    )
  ckpt = checkpointing.Checkpointer(ckpt_dir, config.keep_checkpoints)
  if ckpt.latest_step() is None:
    raise CheckpointError(f'no checkpoint in {ckpt_dir}')
  return ckpt


def write_classes(class_names: tuple[str, ...], workdir: str) -> None:
  """The run's label space (its train split's classes), for evaluating it on any eval split."""
  if jax.process_index() == 0:
    path = epath.Path(workdir) / CLASSES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(f'{name}\n' for name in class_names))


def run_labels(ckpt: checkpointing.Checkpointer, workdir: str) -> Labels:
  """A training run's label space: its classes file; for a run without one, the head's size."""
  path = epath.Path(workdir) / CLASSES_FILE
  if path.exists():
    return Labels.named(path.read_text().splitlines())
  return Labels(ckpt.shape('params.head.bias')[0])


def restore_params(
  config: ml_collections.ConfigDict, ckpt: checkpointing.Checkpointer, params: nnx.State
) -> nnx.State:
  """The weights (EMA when kept) of the latest train state in `ckpt`, on the host."""
  tx = optim.create_optimizer(config, optax.constant_schedule(0.0))  # the structure is all it needs
  abstract = jax.eval_shape(lambda p: create_train_state(p, tx, config.ema_decay > 0), params)
  state = ckpt.restore(with_shardings(abstract, sharding.make_mesh(), config.fsdp))
  ckpt.close()
  return state.eval_params


def write_results(results, workdir: str, writer, step: int | None) -> None:
  """eval_results.json in the workdir (host 0), and the scalars to the metric writer."""
  if writer is not None:
    for name, r in results.items():
      writer.write_scalars(
        step, {f'eval_{name}/{k}': v for k, v in r.items() if isinstance(v, float)}
      )
    writer.flush()
  if jax.process_index() == 0:
    path = epath.Path(workdir) / 'eval_results.json'  # a local folder or gs://
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, allow_nan=False))  # strict JSON


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}

  def visit(prefix, value):
    if isinstance(value, ml_collections.ConfigDict):
      for k, v in value.items():
        visit(f'{prefix}{k}.', v)
    else:
      flat[prefix[:-1]] = value if isinstance(value, int | float | str | bool) else str(value)

  visit('', config)
  return flat
