"""The errors a user fixes: each message is one line that names the problem and the remedy.

The CLIs print them as `error: ...` and exit 1; anything else is a bug in ats-jax.
"""


class CheckpointError(ValueError):
  """A checkpoint that cannot serve the requested model; the message names the problem."""


class InputError(ValueError):
  """A data problem the user must fix (path, dataset, split, image file, batch size); one line."""
