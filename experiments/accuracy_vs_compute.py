"""Accuracy against compute of one trained model with ATS plugged in at several settings.

The paper's central claim: ATS is parameter-free, so the same weights, without fine-tuning, trade a
little accuracy for fewer GFLOPs. Every setting is evaluated on the config's eval split with
`train.evaluate`; the dense model is the reference.

  python -m experiments.accuracy_vs_compute  # the demo's model (workdir/digits)
  python -m experiments.accuracy_vs_compute --settings='dense;1-3:37;2,3:37;1-3:0.5'
  python -m experiments.accuracy_vs_compute --config=configs/deit_s_ats.py \
    --checkpoint=ckpt/deit_s --config.data.data_dir=~/tensorflow_datasets --out=/tmp/deit_s.png

`--settings` is a ';'-separated list of BLOCKS:CAPS, or 'dense'. BLOCKS are block indices and
inclusive ranges (`1,2,3` = `1-3`); CAPS is the cap K of every ATS block or one per block
(`28,21,16`), a count of tokens or, when <= 1, a ratio of the tokens entering the block (as
`config.num_tokens`). The default covers the config's own setting and a few from the model's depth.
"""

from __future__ import annotations

import os
import sys

import jax
import matplotlib
import ml_collections
from absl import app, flags
from flax import nnx

from ats_jax.data import input_pipeline
from ats_jax.models import flops
from ats_jax.training import sharding, train
from experiments import trained

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the headless backend)

FIGSIZE = (6.4, 4.8)  # inches; at DPI the PNG is exactly 640 x 480 pixels
DPI = 100
FLAGS = flags.FLAGS
Setting = tuple[tuple[int, ...], tuple[float, ...]]  # (ATS blocks, caps); ((), ()) is dense
DENSE: Setting = ((), ())


def parse_settings(text: str) -> list[Setting]:
  """'dense;1-3:37;2,3:28,21' -> [((), ()), ((1, 2, 3), (37.0,)), ((2, 3), (28.0, 21.0))]."""
  settings = []
  for item in filter(None, (s.strip() for s in text.split(';'))):
    if item == 'dense':
      settings.append(DENSE)
      continue
    blocks_text, sep, caps_text = item.partition(':')
    try:
      if not sep:
        raise ValueError
      blocks = []
      for part in blocks_text.split(','):
        lo, _, hi = part.partition('-')
        blocks.extend(range(int(lo), int(hi or lo) + 1))
      settings.append((tuple(blocks), tuple(float(c) for c in caps_text.split(','))))
    except ValueError:
      raise ValueError(
        f"setting {item!r} is not 'dense' or BLOCKS:CAPS (e.g. 1-3:37 or 2,3:0.5)"
      ) from None
  return settings


def default_settings(config: ml_collections.ConfigDict, depth: int, tokens: int) -> list[Setting]:
  """Dense, the config's setting, then ATS from the first quarter / half of the blocks on at the
  never-binding cap, one block alone, and ratio caps 0.75, 0.5, 0.25 (the original's 3-11 at 12)."""
  first = max(1, depth // 4)
  late = tuple(range(first, depth))
  settings = [
    DENSE,
    (tuple(config.ats_blocks), tuple(float(c) for c in config.num_tokens)),
    (late, (tokens,)),
    (late[1:], (tokens,)),
    (tuple(range(depth // 2, depth)), (tokens,)),
    ((first,), (tokens,)),
    *[(late, (ratio,)) for ratio in (0.75, 0.5, 0.25)],
  ]
  settings = [s if s[0] else DENSE for s in settings]
  return list(dict.fromkeys((b, tuple(float(c) for c in k)) for b, k in settings))


def label(setting: Setting) -> str:
  """'dense', or e.g. 'ATS 1-3 K=37' (ranges compacted; caps joined by '/')."""
  blocks, caps = setting
  if not blocks:
    return 'dense'
  runs, start = [], blocks[0]
  for prev, cur in zip(blocks, [*blocks[1:], None], strict=True):
    if cur != prev + 1:
      runs.append(str(start) if start == prev else f'{start}-{prev}')
      start = cur
  return f'ATS {",".join(runs)} K={"/".join(f"{c:g}" for c in caps)}'


def evaluate_settings(
  config, params, settings, info: input_pipeline.DatasetInfo, image_size: int
) -> list[dict]:
  """Each setting's eval results (`train.evaluate`), all with the same parameters."""
  mesh = sharding.make_mesh()
  params = jax.device_put(params, sharding.param_sharding(params, mesh, config.fsdp))
  rows = []
  for setting in settings:
    blocks, caps = setting
    abstract = nnx.eval_shape(
      lambda b=blocks, c=caps: train.build_model(
        config, info.num_classes, ats_blocks=b, num_tokens=c
      )
    )
    graphdef = nnx.split(abstract)[0]
    name = 'dense' if not blocks else f'ATS {len(blocks)} blocks'
    result = train.evaluate(config, graphdef, params, mesh, image_size, blocks, info.labels, name)
    rows.append({'setting': label(setting), 'ats_blocks': list(blocks), 'num_tokens': list(caps)})
    rows[-1].update(result)
  return rows


def plot(rows: list[dict], title: str, path: str) -> None:
  """Top-1 against GFLOPs/image, each point labelled; the dense model a distinct star."""
  fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
  dense = next(r for r in rows if not r['ats_blocks'])
  ats = [r for r in rows if r['ats_blocks']]
  ax.scatter(
    [r['gflops'] for r in ats], [100 * r['top1'] for r in ats], label='ATS, no fine-tuning'
  )
  ax.scatter(
    dense['gflops'], 100 * dense['top1'], marker='*', s=220, c='tab:red', label='dense', zorder=3
  )
  ax.axhline(100 * dense['top1'], color='tab:red', lw=0.8, ls=':')
  ax.margins(x=0.12, y=0.08)
  label_points(ax, rows)
  relative = ax.secondary_xaxis(
    'top', functions=(lambda g: g / dense['gflops'], lambda r: r * dense['gflops'])
  )
  relative.set_xlabel('GFLOPs relative to dense', fontsize=8)
  ax.set_xlabel('GFLOPs / image')
  ax.set_ylabel('top-1 (%)')
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right', fontsize=8)
  fig.tight_layout()  # moves the axes only: the PNG stays FIGSIZE * DPI
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def label_points(ax, rows: list[dict], fontsize: int = 7) -> None:
  """Labels each point above, below, right or left of it: the first place that overlaps the
  fewest points and labels placed so far."""
  ax.autoscale_view()  # fixes the limits, so data -> pixel positions hold
  pt = ax.figure.dpi / 72  # pixels per point
  gap, dot = 6 * pt, 5 * pt  # label offset; half the side of a marker's box
  points = [ax.transData.transform((r['gflops'], 100 * r['top1'])) for r in rows]
  taken = [(x - dot, x + dot, y - dot, y + dot) for x, y in points]  # (left, right, bottom, top)

  def overlaps(box) -> int:
    return sum(box[0] < b[1] and b[0] < box[1] and box[2] < b[3] and b[2] < box[3] for b in taken)

  for (x, y), r in sorted(zip(points, rows, strict=True), key=lambda p: p[1]['gflops']):
    w, h = 0.6 * fontsize * pt * len(r['setting']), 1.2 * fontsize * pt  # rough text extent
    places = {  # box, text offset in points, alignment
      'above': ((x - w / 2, x + w / 2, y + gap, y + gap + h), (0, 6), 'center', 'bottom'),
      'below': ((x - w / 2, x + w / 2, y - gap - h, y - gap), (0, -6), 'center', 'top'),
      'right': ((x + gap, x + gap + w, y - h / 2, y + h / 2), (6, 0), 'left', 'center'),
      'left': ((x - gap - w, x - gap, y - h / 2, y + h / 2), (-6, 0), 'right', 'center'),
    }
    box, offset, ha, va = min(places.values(), key=lambda p: overlaps(p[0]))  # first of the best
    taken.append(box)
    ax.annotate(
      r['setting'], (r['gflops'], 100 * r['top1']), xytext=offset, textcoords='offset points',
      ha=ha, va=va, fontsize=fontsize,
    )  # fmt: skip


def run(
  config, workdir: str | None, checkpoint: str | None, settings_text: str | None, png: str
) -> dict:
  """Evaluates every setting, plots to `png`; returns what `--json` writes."""
  info = input_pipeline.dataset_info(config.data)
  model = trained.trained_model(config, workdir, checkpoint, info.num_classes, ats_blocks=())
  tokens = model.pos_embed.shape[1]
  settings = (
    parse_settings(settings_text)
    if settings_text
    else default_settings(config, model.spec.depth, tokens)
  )
  if DENSE not in settings:
    settings.insert(0, DENSE)  # the reference every row is compared with
  rows = evaluate_settings(config, nnx.state(model), settings, info, model.img_size)
  dense_gflops = next(r['gflops'] for r in rows if not r['ats_blocks'])
  for r in rows:
    r['relative_gflops'] = r['gflops'] / dense_gflops
  source = checkpoint or workdir
  spec = model.spec
  title = (
    f'{source} ({spec.depth} blocks, dim {spec.embed_dim}, {tokens} tokens), {config.data.name} '
    f'eval split: one set of weights'
  )
  plot(rows, title, png)
  return {
    'model': config.model,
    'weights': source,
    'dataset': config.data.name,
    'examples': rows[0]['examples'],
    'dense_gflops': flops.dense_gflops(model.spec),
    'png': png,
    'rows': rows,
  }


def markdown(result: dict) -> str:
  lines = [
    '| setting | top-1 | GFLOPs/image | vs dense | mean kept tokens per ATS block |',
    '|---|---:|---:|---:|---|',
  ]
  for r in result['rows']:
    kept = ' '.join(f'{b}:{k:g}' for b, k in r['kept_tokens'].items()) or '-'
    lines.append(
      f'| {r["setting"]} | {100 * r["top1"]:.2f} | {r["gflops"]:.4g} '
      f'| {r["relative_gflops"]:.2f} | {kept} |'
    )
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  del argv
  config = FLAGS.config
  try:
    result = run(
      config, FLAGS.workdir, FLAGS.checkpoint or config.checkpoint, FLAGS.settings, FLAGS.out
    )
  except trained.ERRORS as e:
    sys.exit(f'error: {e}')
  print(
    f'{result["model"]} from {result["weights"]}, {result["dataset"]} eval split '
    f'({result["examples"]} images), no fine-tuning; dense {result["dense_gflops"]:.4g} GFLOPs\n'
  )
  print(markdown(result))
  trained.report_files(result, FLAGS.json)


def define_flags() -> None:
  trained.define_flags('experiments/results/accuracy_vs_compute.png', 'The plot (a .png path).')
  flags.DEFINE_string('settings', None, "'dense;1-3:37;2,3:0.5' (see the docstring).")


if __name__ == '__main__':
  define_flags()
  app.run(main)
