"""DeiT-S with ATS in blocks 3-11, cap 197 each: the original's configs/ImageNet/DeiT_S.yaml.

No retraining: the dense DeiT-S checkpoint loads unchanged. The paper reports 4.6 -> 2.9 GFLOPs at
79.7 top-1 (dense 79.9) with the official weights.

  python -m convert deit_small_patch16_224-cd65a155.pth ckpt/deit_s
  python main.py --config=configs/deit_s_ats.py --config.checkpoint=ckpt/deit_s
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'deit_small_patch16_224'
  config.ats_blocks = tuple(range(3, 12))
  config.num_tokens = (197.0,)
  return config
