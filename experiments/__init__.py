"""Benchmarks, studies and pictures of ATS (README, Results)."""

import os

# torch's OpenMP threads spin for a while after each op by default, taking the cores from the JAX
# run timed next (DeiT-S ATS at batch 32 on 2 cores: 833 against 780 ms): let them sleep. Set here,
# before any experiment imports torch.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
