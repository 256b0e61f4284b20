"""User-facing tools built on the library: `predict` (classify photos) and token pictures."""
