"""Defaults every config starts from; each field is overridable: `--config.batch_size=64`.

The hyper-parameters are DeiT's ImageNet recipe (Touvron et al., 2021), as the original ATS trains.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = 'train'  # 'train' (then evaluate), 'evaluate', or 'describe' (zoo, size, cost)
  config.seed = 0

  # Model.
  config.model = 'deit_small_patch16_224'  # a name from ats_jax.models.list_models()
  config.model_overrides = ml_collections.ConfigDict()  # VisionTransformer fields, e.g. depth
  config.checkpoint = ''  # weights to evaluate/describe: converted dir, .pth or .safetensors
  config.init_from = ''  # train: fine-tune from these weights (same formats); '' = from scratch
  config.ats_blocks = ()  # indices of the blocks whose attention samples tokens; () = dense
  config.num_tokens = (197.0,)  # cap K per ATS block (one for all, or one each); <= 1 is a ratio
  # How blocks after the first ATS block run (`ats_jax.layout.Execution`, docs/execution.md):
  # 'budgeted' runs per-token work on a static budget of rows per block, one product per layer,
  # no loops (GPUs, TPUs); 'packed' on the batch's real tokens in chunks (CPUs); 'padded' on every
  # slot; 'auto': budgeted on GPU/TPU, packed on CPU. Same predictions and gradients.
  config.execution = 'auto'
  config.pack_chunks = 64  # loop steps of B*N / pack_chunks rows (>= 256); the rest in 16-row units
  config.attention_sizes = 6  # attention runs on the fewest of these slot counts; 1: one size
  # budgeted: per block, stream rows per device (multiples of 128; None: padded); () calibrates
  # from the first batch and follows the data (`ats_jax.layout.budgets`)
  config.budgets = ()
  config.drop_path = 0.1  # stochastic depth in training (DeiT's), timm's linear rule over blocks
  # Computation dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU; or 'float32', 'bfloat16'.
  # Parameters, logits and ATS scores stay float32.
  config.dtype = 'auto'

  # Data (`ats_jax/data/input_pipeline.py`).
  config.data = ml_collections.ConfigDict()
  config.data.name = 'imagenet2012'  # 'digits' (embedded), 'folder' (ILSVRC2012 layout), or TFDS
  config.data.data_dir = ''  # TFDS data_dir, or for 'folder' the root holding train/ and val/
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'  # a TFDS split; for 'folder' the sub-folder, e.g. 'val'
  config.data.shuffle_buffer = 10_000
  # Eval preprocessing: resize to img_size / crop_pct (256 for 224 at 0.875), centre crop with
  # `interpolation`, normalise with `mean`/`std` (of [0, 1] values). Each None: what the evaluated
  # checkpoint records (DeiT: ImageNet's, 0.875, bicubic; AugReg ViT: 0.5, 0.9, bicubic), else
  # the variant's.
  config.data.mean = None  # e.g. (0.5, 0.5, 0.5)
  config.data.std = None
  config.data.crop_pct = None
  config.data.interpolation = None  # 'bicubic', 'bilinear', ...

  # Augmentation (timm's DeiT setting); each switchable: 0 or False turns it off.
  config.aug = ml_collections.ConfigDict()
  config.aug.random_resized_crop = True
  config.aug.rrc_scale = (0.08, 1.0)
  config.aug.hflip = 0.5  # probability
  config.aug.randaugment_num_ops = 2  # rand-m9-mstd0.5-inc1; 0 = off
  config.aug.randaugment_magnitude = 9.0
  config.aug.randaugment_mstd = 0.5
  config.aug.random_erasing = 0.25  # probability, per-pixel random values as timm's 'pixel' mode
  config.aug.mixup = 0.8  # Beta(alpha) of Mixup; 0 = off
  config.aug.cutmix = 1.0  # Beta(alpha) of CutMix; 0 = off (one of the two per batch, 50/50)
  config.aug.label_smoothing = 0.1
  # DeiT's repeated augmentation: an epoch holds each of 1/repeats of the images `repeats` times,
  # augmented independently and spread over the processes (RASampler); 1 = off
  config.aug.repeats = 3

  # Optimisation (`ats_jax/optim.py`).
  config.batch_size = 1024  # global, over every device of every host
  config.eval_batch_size = 1024  # also the images of 'describe''s timed forward pass
  config.num_epochs = 300.0  # training length: num_epochs, or num_steps when > 0
  config.num_steps = 0
  config.warmup_epochs = 5.0
  config.base_lr = 5e-4  # for batch 512: lr = base_lr * batch_size / 512, as DeiT
  config.min_lr = 1e-5
  config.weight_decay = 0.05  # not on norms, biases, position embedding and tokens
  config.grad_clip_norm = 0.0  # 0 = no clipping
  config.ema_decay = 0.0  # 0 = no EMA of the weights; else e.g. 0.99996, evaluated instead

  # Parallelism (`ats_jax/sharding.py`).
  config.fsdp = False  # shard parameters and optimiser state over the data axis (large models)

  # Start-up.
  # jax.distributed.initialize(): 'auto' under Slurm, Open MPI, a TPU pod or with
  # JAX_COORDINATOR_ADDRESS set; 'on' always (e.g. TPU pod slices); 'off' never (one host).
  config.distributed = 'auto'
  # JAX's persistent compilation cache: 'auto' = ~/.cache/ats_jax/xla ($XDG_CACHE_HOME); a path;
  # '' = off. A second start loads compiled programs instead of compiling them.
  config.compile_cache_dir = 'auto'
  # Programs compiling faster than this are not cached; 0: all, so a second start compiles nothing
  # (the dense evaluation's 0.9 s program, for one, loads in milliseconds).
  config.compile_cache_min_secs = 0.0

  # Checkpoints, logging, evaluation.
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.log_every_steps = 100
  config.eval_every_steps = 0  # 0 = evaluate at the end only
  return config
