"""DeiT-S, dense (ImageNet top-1 79.9 with the official weights).

Evaluate the official weights on ImageNet (TFDS `imagenet2012` prepared in DATA, or
`--config.data.name=folder --config.data.data_dir=/data/ILSVRC2012 --config.data.eval_split=val`):

  python -m convert deit_small_patch16_224-cd65a155.pth ckpt/deit_s
  python main.py --config=configs/deit_s.py --config.mode=evaluate \
    --config.checkpoint=ckpt/deit_s --config.data.data_dir=DATA

Train from scratch with DeiT's recipe (300 epochs, batch 1024): `--workdir=DIR` instead of mode.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'deit_small_patch16_224'
  return config
