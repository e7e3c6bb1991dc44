"""The core: configuration, target selection, layouts and records, the LoRA math, tree functions
(inject, split / combine, merge), optimizers, sharding and checkpoints. Framework frontends
(`lora_jax.linen`, `lora_jax.nnx`), peft files, quantized bases, many-adapter tools, the CLI
and the reference models build on it; it imports none of them."""
