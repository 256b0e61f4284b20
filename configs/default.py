"""Defaults every config starts from; each field is overridable: `--config.batch_size=64`."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = 'deit_small_patch16_224'  # a name from ats_jax.models.list_models()
  config.checkpoint = ''  # converted dir, .pth or .safetensors; '' = random init (seed)
  config.ats_blocks = ()  # indices of the blocks whose attention samples tokens; () = dense
  config.num_tokens = (197.0,)  # cap K per ATS block (one for all, or one each); <= 1 is a ratio
  config.dtype = 'float32'  # computation dtype; 'bfloat16' on accelerators. Params stay float32.
  config.mode = 'describe'  # 'describe': the zoo, the model's size and cost, one timed forward pass
  config.batch_size = 8
  config.seed = 0
  return config
