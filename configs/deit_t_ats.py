"""DeiT-T with ATS in blocks 3-11, cap 197 each: the original's DeiT-S setting on DeiT-T.

No retraining: the dense DeiT-T checkpoint loads unchanged.

  python -m convert deit_tiny_patch16_224-a1311bcf.pth ckpt/deit_t
  python main.py --config=configs/deit_t_ats.py --config.mode=evaluate \
    --config.checkpoint=ckpt/deit_t --config.data.data_dir=DATA
"""

from configs import deit_s_ats


def get_config():
  config = deit_s_ats.get_config()
  config.model = 'deit_tiny_patch16_224'
  return config
