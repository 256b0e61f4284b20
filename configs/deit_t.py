"""DeiT-T (ImageNet top-1 72.2 with the official weights), dense; the quickest model on a CPU.

python main.py --config=configs/deit_t.py
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'deit_tiny_patch16_224'
  return config
