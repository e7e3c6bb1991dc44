"""The Flax NNX frontend: LoRA on `nnx.Module` models (see `lora_jax.nnx.frontend`)."""

from lora_jax.nnx.frontend import *  # noqa: F403  (the frontend's public names, its __all__)
from lora_jax.nnx.frontend import __all__  # noqa: F401
