"""`lora-jax finetune --frontend nnx`: the run's LoRA on the Flax NNX reference models.

`on_nnx` puts the run's setup (the same for both frontends) on the NNX twin of the model and
makes the forward the NNX model's; the params stay the linen-form dict, so training,
checkpoints, `--resume` and the saved peft adapter are the linen run's (docs/guides/nnx.md).
With `--dropout 0` both frontends give the same losses; with dropout their masks differ.

    check(loaded.model_type, "lm", "lora", None)   # before any setup: a one-line error
    setup = on_nnx(setup_method(loaded, "lm", "lora"), loaded)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lora_jax.models import nnx_gpt2, nnx_llama
from lora_jax.models.nnx_stack import from_linen_params, load

# model_type -> (the NNX causal LM class, its layer stacks)
NNX_MODELS = {"gpt2": (nnx_gpt2.GPT2LMHeadModel, nnx_gpt2.LAYER_STACKS),
              "llama": (nnx_llama.LlamaForCausalLM, nnx_llama.LAYER_STACKS)}


def check(model_type: str, task: str, method: str, quantize: str | None) -> None:
    """Raise for what the NNX frontend does not run (a one-line ValueError naming the flag)."""
    if model_type not in NNX_MODELS or task != "lm":
        raise ValueError(f"--frontend nnx runs causal LMs ({', '.join(sorted(NNX_MODELS))}, "
                         f"--task lm); this is a {model_type} model with --task {task}: use "
                         "--frontend linen")
    if method != "lora":
        raise ValueError(f"--frontend nnx runs --method lora, not {method}: use --frontend linen")
    if quantize:
        raise ValueError("--frontend nnx with --quantize: the NNX models hold float kernels; "
                         "use --frontend linen for QLoRA")


def on_nnx(setup: Any, loaded: Any) -> Any:
    """`setup` (a `lora_jax.cli.method.Setup` of the linen model in `loaded`, as `check` allows)
    with the forward of the NNX twin of the model carrying the same weights and records."""
    import jax.numpy as jnp
    from flax import nnx

    import lora_jax.nnx.frontend as lnnx
    from lora_jax.core.record import iter_records
    from lora_jax.core.targets import without_leaves

    cls, stacks = NNX_MODELS[loaded.model_type]
    module = loaded.module
    model = nnx.eval_shape(lambda: cls(
        module.config, dtype=module.dtype, param_dtype=module.param_dtype,
        scan_layers=module.scan_layers, remat=module.remat_policy is not None,
        rngs=nnx.Rngs(0)))
    params = setup.params
    lora = {(item.path, name) for item in iter_records(params) for name in item.record.leaves}
    load(model, without_leaves(params, lora), stacks)  # the base weights (PiSSA: the residual)
    # The factors and records; a dropout stream for each adapted module, reseeded from the
    # step's key on every call by `functional`.
    lnnx.adapt(model, from_linen_params(params, stacks), nnx.Rngs(dropout=0))
    apply = lnnx.functional(model)

    def forward(p: Mapping[str, Any], batch: Mapping[str, Any], dropout_key: Any) -> Any:
        return apply(from_linen_params(p, stacks), jnp.asarray(batch["input_ids"]),
                     batch["attention_mask"], dropout_key=dropout_key)

    return dataclasses.replace(setup, forward=forward)

