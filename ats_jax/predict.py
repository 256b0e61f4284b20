"""`python -m ats_jax.predict`: the classify-a-photo CLI at its published path (the code lives in
`ats_jax.tools.predict`)."""

from ats_jax.tools.predict import run

if __name__ == '__main__':
  run()
