"""DeiT-B with ATS in blocks 3-11, cap 197 each: the original's DeiT-S setting on DeiT-B.

No retraining: the dense DeiT-B checkpoint loads unchanged.

  python -m convert deit_base_patch16_224-b5f2ef4d.pth ckpt/deit_b
  python main.py --config=configs/deit_b_ats.py --config.mode=evaluate \
    --config.checkpoint=ckpt/deit_b --config.data.data_dir=DATA
"""

from configs import deit_s_ats


def get_config():
  config = deit_s_ats.get_config()
  config.model = 'deit_base_patch16_224'
  return config
