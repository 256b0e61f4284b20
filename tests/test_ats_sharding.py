"""The ATS model under data-parallel sharding equals the single-device run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ats_jax.models import vit
  from tests.test_ats import TINY, perturb

  assert jax.device_count() == 4
  model = vit.VisionTransformer(**TINY, ats_blocks=(1, 2, 3), num_tokens=(0.9, 12, 10),
                                rngs=nnx.Rngs(0))
  model.eval()
  perturb(model)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), jnp.float32)
  forward = nnx.jit(lambda m, x: m(x, return_stats=True))
  single_logits, single_stats = forward(model, images)
  mesh = jax.make_mesh((4,), ('data',))
  sharded = jax.device_put(images, NamedSharding(mesh, P('data')))
  logits, stats = forward(model, sharded)
  assert len(logits.sharding.device_set) == 4, logits.sharding
  np.testing.assert_array_equal(stats['kept_tokens'], single_stats['kept_tokens'])
  np.testing.assert_allclose(np.asarray(logits), np.asarray(single_logits), rtol=1e-4, atol=1e-5)
  print('ok', np.asarray(stats['kept_tokens']).sum())
""")


def test_sharded_batch_over_four_devices_equals_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, env=env,
                        check=False)  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith('ok ')
