"""The flax.linen frontend: `wrap` a model's apply so adapted layers add their deltas, and
`layouts` to read how a model's layers hold their weights."""

from lora_jax.linen.frontend import layouts, wrap

__all__ = ["layouts", "wrap"]
