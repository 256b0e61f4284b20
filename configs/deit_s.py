"""DeiT-S (ImageNet top-1 79.9 with the official weights), dense.

python -m convert deit_small_patch16_224-cd65a155.pth ckpt/deit_s
python main.py --config=configs/deit_s.py --config.checkpoint=ckpt/deit_s
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'deit_small_patch16_224'
  return config
