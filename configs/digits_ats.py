"""The embedded default: a small ViT with ATS trained on scikit-learn's handwritten digits.

Needs no download (the 1,797 8x8 digits ship inside scikit-learn); under 3 minutes on 2 CPU cores.
Trains with ATS in blocks 1-3, then evaluates the same weights with and without ATS:

  python main.py --config=configs/digits_ats.py --workdir=workdir/digits

Expected (2 CPU cores with AVX-512, 880 steps): ATS top-1 91.1% at 0.0057 GFLOPs/image (blocks 1-3
keep about 23, 21 and 19 of 37 tokens); the same weights dense 88.6% at 0.0081. The eval split has
360 images and training is short: a change in summation order anywhere moves top-1 by a few points
(88.3% while q, k and v left the per-token section as three arrays, 91.9% and 91.4% before ATS
blocks took their sampling logits there; on a CPU with AVX2 only, whose XLA kernels sum in another
order, ATS 89.2% and dense 85.6%).

The table's images/s column times this 4-block, 37-token model, where sampling costs more than the
tokens it saves; a labelled line after it times a DeiT-S-sized ATS model against dense on photos
(`experiments.demo_speed`, random weights with sharp attention; `--config.demo_speed=False`: off).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'deit_tiny_patch16_224'
  config.model_overrides.img_size = 24  # 8x8 digits upsampled; patch 4: 36 patches + cls
  config.model_overrides.patch_size = 4
  config.model_overrides.embed_dim = 64
  config.model_overrides.depth = 4
  config.model_overrides.num_heads = 4
  config.ats_blocks = (1, 2, 3)
  config.num_tokens = (37.0,)  # the original's setting: the cap never binds
  config.drop_path = 0.0  # a 4-block model trained from scratch

  config.data.name = 'digits'
  config.data.crop_pct = 1.0  # the whole digit: no border to crop
  config.aug.rrc_scale = (0.6, 1.0)
  config.aug.hflip = 0.0  # a mirrored digit is another symbol
  config.aug.randaugment_num_ops = 0
  config.aug.random_erasing = 0.0
  config.aug.mixup = 0.0
  config.aug.cutmix = 0.0
  config.aug.repeats = 1

  config.batch_size = 64
  config.eval_batch_size = 120  # 360 = 3 x 120
  config.num_epochs = 40.0
  config.warmup_epochs = 3.0
  config.base_lr = 8e-3  # lr 1e-3 at batch 64: a small model from scratch
  config.checkpoint_every_steps = 200
  config.log_every_steps = 50
  # After the table: a DeiT-S-sized ATS model timed against dense (`experiments.demo_speed`)
  config.demo_speed = True
  return config
