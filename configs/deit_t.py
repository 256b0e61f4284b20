"""DeiT-T, dense (ImageNet top-1 72.2 with the official weights); the quickest model on a CPU.

  python main.py --config=configs/deit_t.py --config.mode=describe  # zoo, cost, a timed forward
  python main.py --config=configs/deit_t.py --config.mode=evaluate \
    --config.checkpoint=ckpt/deit_t --config.data.data_dir=DATA   # see configs/deit_s.py
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'deit_tiny_patch16_224'
  return config
