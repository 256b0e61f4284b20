"""Trained weights for the experiment scripts: a training run's latest state, or a checkpoint.

Both scripts take the same inputs as `main.py`: `--config` (with `--config.x=...` overrides) and
`--workdir`, or `--checkpoint` (a converted directory, `.pth` or `.safetensors`).
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import flags
from flax import nnx
from ml_collections import config_flags

from ats_jax.data import input_pipeline
from ats_jax.errors import CheckpointError, InputError
from ats_jax.models import VisionTransformer, create_model
from ats_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'digits_ats.py')
DEFAULT_WORKDIR = 'workdir/digits'  # where `make demo` trains, relative to the repository root
ERRORS = (CheckpointError, InputError, FileNotFoundError, ValueError)


def define_flags(out: str, out_help: str) -> None:
  """The flags both scripts share. A script defines them only when run, so that tests can
  import both scripts into one process."""
  config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Config file; --config.x=... sets x.')
  flags.DEFINE_string('workdir', DEFAULT_WORKDIR, 'Training run whose latest weights to load.')
  flags.DEFINE_string('checkpoint', None, 'Weights instead of --workdir (converted, .pth, ...).')
  flags.DEFINE_string('out', out, out_help)
  flags.DEFINE_string('json', None, 'Also write the results here as JSON.')


def trained_model(
  config: ml_collections.ConfigDict,
  workdir: str | None,
  checkpoint: str | None = None,
  num_classes: int | None = None,
  **overrides,
) -> VisionTransformer:
  """The config's model (ATS as configured unless `overrides` say otherwise) with trained weights.

  `checkpoint` wins over `workdir`; a checkpoint's class count is used unless `num_classes` is set.
  A workdir without a checkpoint raises CheckpointError with a hint on how to make one.
  """
  if checkpoint:
    kwargs = train.model_options(config)
    if num_classes is not None:
      kwargs['num_classes'] = num_classes
    model = create_model(config.model, checkpoint=checkpoint, **kwargs | overrides)
  else:
    if num_classes is None:
      num_classes = input_pipeline.dataset_info(config.data).num_classes
    # Shapes only: initialising weights that the checkpoint replaces costs seconds.
    abstract = nnx.eval_shape(lambda: train.build_model(config, num_classes, **overrides))
    graphdef, params = nnx.split(abstract)
    try:
      params = train.restore_params(config, train.open_run(config, workdir), params)
    except CheckpointError as e:
      raise CheckpointError(
        f'{e}; train one first (`make demo` trains {DEFAULT_WORKDIR}), or pass --checkpoint'
      ) from None
    model = nnx.merge(graphdef, params)
  model.eval()
  return model


def report_files(result: dict, json_path: str | None) -> None:
  """Says where the PNG went; writes the result as JSON too when asked."""
  print(f'\nwrote {result["png"]}')
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(result, f, indent=2)
