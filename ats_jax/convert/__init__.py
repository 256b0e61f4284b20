"""Checkpoint import: timm/DeiT `.pth`/`.safetensors`, big_vision `.npz`, Hugging Face directories
-> Flax params, with no PyTorch needed (`python -m convert`)."""
