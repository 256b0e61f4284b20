"""DeiT-S with ATS in blocks 3-11, cap 197 each: the original's configs/ImageNet/DeiT_S.yaml.

No retraining: the dense DeiT-S checkpoint loads unchanged. The paper reports 4.6 -> 2.9 GFLOPs at
79.7 top-1 (dense 79.9) with the official weights. Evaluate (prints ATS and dense side by side):

  python -m convert deit_small_patch16_224-cd65a155.pth ckpt/deit_s
  python main.py --config=configs/deit_s_ats.py --config.mode=evaluate \
    --config.checkpoint=ckpt/deit_s --config.data.data_dir=DATA

Fine-tune with ATS in place (DeiT's recipe, from the dense weights):

  python main.py --config=configs/deit_s_ats.py --workdir=DIR --config.init_from=ckpt/deit_s \
    --config.num_epochs=30 --config.base_lr=5e-5 --config.warmup_epochs=0
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'deit_small_patch16_224'
  config.ats_blocks = tuple(range(3, 12))
  config.num_tokens = (197.0,)
  return config
