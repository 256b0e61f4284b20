"""Token layouts: where per-token work and attention run once ATS has masked tokens (padded,
packed, budgeted), with the custom VJPs that keep their memory at the inputs."""
