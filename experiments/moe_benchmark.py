"""LoRA on mixture-of-experts weights: step time and compiled memory, one process, same batch.

A Qwen3-MoE-shaped decoder (`lora_jax.models.decoder`, random weights), next-token loss, AdamW on
the trainable half (split -> grad -> update -> combine):
- frozen-base bound: forward + activation gradients, no weight gradients (the gradient of the
  loss with respect to the embedding output), which no LoRA step can beat;
- LoRA on attention only (q/k/v/o), the usual recipe;
- LoRA on attention + experts (`target_parameters=["mlp.experts.gate_up_proj",
  "mlp.experts.down_proj"]`) through the experts' layer rule, the routed tokens' low-rank term
  by grouped matmuls on the sorted tokens ("ragged", `jax.lax.ragged_dot`) or by gathering each
  token's expert factors ("gather");
- the same adapter through the materialising fallback (no layer rule: W + scale * A B formed for
  every expert in every step).
Memory is XLA's memory analysis of the compiled step (arguments + outputs + temporaries).

    python experiments/moe_benchmark.py --out experiments/results/moe_benchmark_cpu.json

Prints a markdown table (the one in experiments/results/moe_benchmark_cpu.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from benchmark import compile_with_bytes, lm_loss, timed

import lora_jax
from lora_jax.models import decoder, experts

SIZES = {
    "cpu": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
                num_experts_per_tok=2, moe_intermediate_size=256),
    "gpu": dict(vocab_size=32768, hidden_size=1024, intermediate_size=3072,
                num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                head_dim=64, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=512),
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def lora_step(model: nn.Module, params: dict, ids: jax.Array, config: lora_jax.LoraConfig,
              layouts: dict | None) -> tuple[Callable[[], Any], int | None]:
    """A compiled LoRA training step on `params` (factors injected with `layouts`)."""
    tx = optax.adamw(1e-4)
    adapted = lora_jax.inject(params, config, jax.random.key(1), layouts=layouts)
    trainable, frozen = lora_jax.split(adapted, config)
    apply = lora_jax.wrap(model.apply, config)

    @jax.jit
    def step(t, frozen, state, ids):
        loss, grads = jax.value_and_grad(
            lambda t: lm_loss(apply({"params": lora_jax.combine(t, frozen)}, ids), ids))(t)
        updates, state = tx.update(grads, state, t)
        return optax.apply_updates(t, updates), state, loss

    live = {"t": trainable, "s": tx.init(trainable)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the materialising fallback's warning, once per trace
        fn, nbytes = compile_with_bytes(step, live["t"], frozen, live["s"], ids)

    def run():
        live["t"], live["s"], loss = fn(live["t"], frozen, live["s"], ids)
        return loss

    return run, nbytes


def frozen_step(model: nn.Module, params: dict, ids: jax.Array) -> tuple[Callable[[], Any], int]:
    """d loss / d (embedding output) with every weight constant: the bound."""

    def with_delta(delta):
        def add(next_fun, a, kw, context):
            out = next_fun(*a, **kw)
            if context.method_name == "__call__" and context.module.name == "embed_tokens":
                return out + delta.astype(out.dtype)
            return out

        with nn.intercept_methods(add):
            return lm_loss(model.apply({"params": params}, ids), ids)

    @jax.jit
    def step(params_, ids):
        del params_  # passed so the weights are arguments, as in the other steps
        delta = jnp.zeros((*ids.shape, model.config.hidden_size), jnp.float32)
        return jax.value_and_grad(with_delta)(delta)

    fn, nbytes = compile_with_bytes(step, params, ids)
    return lambda: fn(params, ids), nbytes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    config = decoder.Config(model_type="qwen3_moe", qk_norm=True, norm_topk_prob=True,
                            **SIZES[args.size])
    model = decoder.build(config, dtype=dtype, param_dtype=dtype, scan_layers=True)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, config.vocab_size)
    params = jax.jit(lambda k: model.init(k, ids[:1, :8])["params"])(jax.random.key(0))
    layouts = lora_jax.layouts(model, ids[:1, :8])
    lora = dict(r=args.r, lora_alpha=2 * args.r)
    modes: dict[str, tuple[Callable[[], Any], int | None]] = {
        "frozen-base bound": frozen_step(model, params, ids),
        "LoRA attention": lora_step(model, params, ids,
                                    lora_jax.LoraConfig(**lora, target_modules=ATTENTION),
                                    layouts)}
    both = lora_jax.LoraConfig(**lora, target_modules=ATTENTION, target_parameters=EXPERTS)
    for how in ("ragged", "gather"):
        experts.EXPERT_DELTA = how  # read when the step is traced
        modes[f"LoRA attention + experts ({how})"] = lora_step(model, params, ids, both, layouts)
    experts.EXPERT_DELTA = "ragged"
    # The experts' reading without their rule: target_parameters materialises W + scale * A B.
    no_rule = {path: dataclasses.replace(layout, rule=None) if "experts" in path else layout
               for path, layout in layouts.items()}
    modes["LoRA attention + experts (materialised W + AB)"] = lora_step(model, params, ids,
                                                                        both, no_rule)
    seconds = timed({name: fn for name, (fn, _) in modes.items()}, args.iters)
    bound = seconds["frozen-base bound"]
    materialised = modes["LoRA attention + experts (materialised W + AB)"][1]
    rows = {name: {"step_s": seconds[name], "vs_frozen_base": seconds[name] / bound,
                   "bytes": nbytes, "bytes_vs_materialised":
                   None if nbytes is None or materialised is None else nbytes / materialised}
            for name, (_, nbytes) in modes.items()}
    n_base = sum(x.size for x in jax.tree.leaves(params))
    expert_weights = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                         if "experts" in jax.tree_util.keystr(p))
    result = {"device": str(jax.devices()[0]), "platform": platform.platform(),
              "jax": jax.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "model": SIZES[args.size], "base_params": n_base, "expert_params": expert_weights,
              "tokens_per_step": int(ids.size), "modes": rows}
    print("| mode | step ms | x frozen-base step | compiled MB | x materialised |\n"
          "|---|---|---|---|---|")
    for name, row in rows.items():
        mb = "-" if row["bytes"] is None else f"{row['bytes'] / 1e6:.1f}"
        rel = "-" if row["bytes_vs_materialised"] is None else \
            f"{row['bytes_vs_materialised']:.3f}"
        print(f"| {name} | {1e3 * row['step_s']:.1f} | {row['vs_frozen_base']:.2f} | {mb} | "
              f"{rel} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
