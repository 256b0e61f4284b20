r"""Classify image files with a checkpoint: top-5 ImageNet classes, kept tokens per block, GFLOPs.

  python -m ats_jax.predict --checkpoint=ckpt/deit_s --ats_blocks=3,4,5,6,7,8,9,10,11 cat.jpg
  python -m ats_jax.predict --checkpoint=deit_small_patch16_224-cd65a155.pth \
    --model=deit_small_patch16_224 --ats_blocks=3,4,5,6,7,8,9,10,11 --save_tokens=/tmp/tok a.jpg

The checkpoint is a converted directory, a `.pth` or a `.safetensors` (the variant read from the
directory or inferred from the shapes unless `--model` names it). Images are decoded by PIL and
prepared with the checkpoint's own eval transform (mean, std, crop_pct, interpolation from its
`ats_jax.json`, else the variant's: DeiT's for deit_*, AugReg's for vit_*). `--save_tokens=DIR`
writes DIR/<image>.png: the photo, then per ATS block the same photo with the patches that block
dropped greyed, each labelled above ('block 3: 97 kept': patches kept).

Class names (`ats_jax/data/imagenet_classes.txt`, one per line in class order) are the WordNet
lemmas of ImageNet-1k's classes as timm ships them (`timm/data/_info`, Apache-2.0; WordNet 3.0
license).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from ats_jax import backend
from ats_jax.convert import pretrained
from ats_jax.convert.timm import infer_model_name
from ats_jax.data import images
from ats_jax.data.labels import imagenet_classes
from ats_jax.models import CheckpointError, VisionTransformer, create_model, enable
from ats_jax.tools import token_pictures
from ats_jax.training import runtime

BATCH = 16  # images per forward pass


@dataclasses.dataclass
class Prediction:
  image: str
  top: list[tuple[str, float]]  # (class name, probability), most likely first
  kept_tokens: list[int]  # per block, tokens entering its MLP (prefix tokens included)
  gflops: float


def class_names(num_classes: int) -> tuple[str, ...]:
  """ImageNet's names for a 1,000-class head, else 'class <i>'."""
  if num_classes == len(imagenet_classes()):
    return imagenet_classes()
  return tuple(f'class {i}' for i in range(num_classes))


def checkpoint_model(checkpoint: str) -> str:
  """The variant of a converted directory (its metadata) or of a PyTorch file (its shapes)."""
  meta = pathlib.Path(checkpoint) / pretrained.METADATA_FILE
  if meta.is_file():
    return json.loads(meta.read_text())['model']
  return infer_model_name(pretrained.read_state_dict(checkpoint))


def load_model(
  checkpoint: str,
  model: str | None = None,
  ats_blocks: tuple[int, ...] = (),
  num_tokens: tuple[float, ...] = (197.0,),
  dtype: str = 'auto',
) -> VisionTransformer:
  """The checkpoint's model in eval mode, ATS in `ats_blocks` (none: dense)."""
  name = model or checkpoint_model(checkpoint)
  loaded = create_model(name, checkpoint=checkpoint, dtype=backend.compute_dtype(dtype))
  enable.enable_ats(loaded, ats_blocks, num_tokens)
  loaded.eval()
  return loaded


@nnx.jit
def _forward(model: VisionTransformer, x: jax.Array):
  logits, stats = model(x, return_stats=True)
  return jax.nn.softmax(logits, axis=-1), stats


def predict(
  model: VisionTransformer, paths: list[str], top: int = 5, save_tokens: str | None = None
) -> list[Prediction]:
  """Each image's top classes, kept tokens per block and GFLOPs; with `save_tokens` also its
  token picture (DIR/<image name>.png)."""
  names = class_names(model.spec.num_classes)
  size, data = model.img_size, model.data_config
  out = []
  for start in range(0, len(paths), BATCH):
    chunk = paths[start : start + BATCH]
    batch = np.stack([images.eval_transform(images.read_image(p), size, data) for p in chunk])
    probs, stats = jax.device_get(_forward(model, jnp.asarray(batch)))
    for i, path in enumerate(chunk):
      best = np.argsort(-probs[i])[:top]
      out.append(
        Prediction(
          path,
          [(names[c], float(probs[i, c])) for c in best],
          stats['kept_tokens'][i].tolist(),
          float(stats['gflops'][i]),
        )
      )
    if save_tokens:
      save_token_pictures(model, batch, chunk, stats['kept_ids'], save_tokens)
  return out


def save_token_pictures(
  model: VisionTransformer, batch: np.ndarray, paths: list[str], kept_ids: list, out_dir: str
) -> list[str]:
  """DIR/<image name>.png per image: the photo, then per ATS block its dropped patches greyed
  (`kept_ids`: the model's `stats['kept_ids']` for `batch`)."""
  if not enable.ats_blocks(model):
    raise ValueError('--save_tokens needs ATS blocks: set --ats_blocks')
  os.makedirs(out_dir, exist_ok=True)
  shown = images.denormalize(batch, model.data_config)
  written = []
  for i, path in enumerate(paths):
    ids = [block_ids[i] for block_ids in kept_ids]
    picture = token_pictures.token_strip(shown[i], ids, model)
    written.append(os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + '.png'))
    picture.save(written[-1])
  return written


def report(predictions: list[Prediction], model: VisionTransformer) -> str:
  """What the command prints: per image its GFLOPs, kept tokens per block and top classes."""
  blocks = enable.ats_blocks(model)
  lines = []
  for p in predictions:
    kept = ' '.join(f'{b}:{p.kept_tokens[b]}' for b in blocks) if blocks else 'all (dense)'
    lines.append(f'{p.image}: {p.gflops:.2f} GFLOPs, kept tokens per ATS block {kept}')
    lines += [f'  {100 * prob:6.2f}%  {name}' for name, prob in p.top]
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('checkpoint', None, 'Converted directory, .pth or .safetensors.')
  flags.DEFINE_string('model', None, 'Variant name; default: from the checkpoint.')
  flags.DEFINE_list('ats_blocks', [], 'Blocks that sample tokens, e.g. 3,4,...,11; none: dense.')
  flags.DEFINE_list('num_tokens', ['197'], 'Cap K per ATS block (one for all, or one each).')
  flags.DEFINE_integer('top', 5, 'Classes to print per image.')
  flags.DEFINE_string('save_tokens', None, 'Write token pictures (PNG per image) here.')
  flags.DEFINE_string('dtype', 'auto', "Computation dtype: 'auto' (bf16 on GPU/TPU), 'float32'...")
  flags.DEFINE_string('compile_cache_dir', 'auto', "JAX's compilation cache; '' = off.")
  flags.mark_flag_as_required('checkpoint')


def main(argv: list[str]) -> None:
  paths = argv[1:]
  if FLAGS.verbosity < 1:  # results and `error:` lines only; INFO lines with --verbosity=1
    logging.set_verbosity(logging.WARNING)
  runtime.quiet_library_logs()
  cache = runtime.enable_compile_cache(FLAGS.compile_cache_dir)
  try:
    if not paths:
      raise ValueError('no images: python -m ats_jax.predict --checkpoint=CKPT IMAGE...')
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:  # before the model loads: a typo should not cost a restore
      raise ValueError(f'no such image file: {", ".join(missing)}')
    blocks = tuple(int(b) for b in FLAGS.ats_blocks)
    caps = tuple(float(k) for k in FLAGS.num_tokens)
    model = load_model(FLAGS.checkpoint, FLAGS.model, blocks, caps, FLAGS.dtype)
    predictions = predict(model, paths, FLAGS.top, FLAGS.save_tokens)
  except (CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  print(report(predictions, model))
  if FLAGS.save_tokens:
    print(f'token pictures in {FLAGS.save_tokens}')
  runtime.log_cache_use(cache)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, except that help asked for (--help, --helpfull...) ends with status 0."""
  try:
    return FLAGS(argv)
  except SystemExit as e:  # while parsing, only absl's help flags exit: status 1, as for an error
    raise SystemExit(0 if e.code == 1 else e.code) from None
  except flags.Error as e:
    sys.exit(f'FATAL Flags parsing error: {e}\nPass --help or --helpfull to see help on flags.')


def run() -> None:
  """The console entry point (`ats-jax-predict`, `python -m ats_jax.predict`): flags defined here,
  so importing the module defines none."""
  define_flags()
  # --help lists the key flags of the module named sys.argv[0] (the script, or the shim's path)
  for flag in FLAGS.get_key_flags_for_module(__name__):
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  # absl's --help prints __main__'s docstring: a console script has none, the shim's names a path
  sys.modules['__main__'].__doc__ = __doc__
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
