"""`python -m convert IN OUT`: the checkpoint converter at its published path (the code lives in
`ats_jax.convert.cli`)."""

import sys

from ats_jax.convert.cli import main

if __name__ == '__main__':
  sys.exit(main())
