"""NNX LoRA training step against the linen one: same GPT-2, same weights, same LoRA, same batch.

- linen: `lora_jax.wrap` + split -> grad of the trainable half -> adamw -> combine, under
  `jax.jit` (the README's idiom; what experiments/benchmark.py calls "LoRA");
- NNX, `nnx.jit`: `lora_jax.nnx.inject` on `lora_jax.models.nnx_gpt2`, `nnx.Optimizer(model,
  tx, wrt=nnx.LoRAParam)`, `nnx.value_and_grad(argnums=nnx.DiffState(0, nnx.LoRAParam))` (the
  NNX idiom; nnx.jit walks the module graph in Python on every call);
- NNX, functional: `nnx.split(model, nnx.LoRAParam, ...)` once, then a `jax.jit` step on the
  factor state with `nnx.merge` inside (no graph walk per call) and optax on the factor state.

    python experiments/nnx_benchmark.py                    # the "cpu" GPT-2 of benchmark.py
    python experiments/nnx_benchmark.py --scan             # nn.scan / nnx.scan stacks
    python experiments/nnx_benchmark.py --dora             # DoRA in both frontends

Times are medians over --iters calls after warm-up, the variants interleaved round by round.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import jax
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import SIZES, lm_loss, timed  # noqa: E402

import lora_jax  # noqa: E402
import lora_jax.nnx.frontend as lnnx  # noqa: E402
from lora_jax.models import gpt2, nnx_gpt2  # noqa: E402
from lora_jax.models.nnx_stack import load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config = gpt2.Config(**SIZES[args.size])
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, config.vocab_size)
    lora = lora_jax.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["c_attn"],
                               use_dora=args.dora)
    tx = optax.adamw(1e-4)

    # linen
    model = gpt2.build(config, scan_layers=args.scan)
    base = model.init(jax.random.key(0), ids[:1, :8])["params"]
    layouts = lora_jax.layouts(model, ids[:1, :8]) if args.scan else None
    params = lora_jax.inject(base, lora, jax.random.key(1), layouts=layouts)
    trainable, frozen = lora_jax.split(params, lora)
    apply = lora_jax.wrap(model.apply, lora)

    @jax.jit
    def linen_step(t, frozen, state, ids):
        loss_of = lambda t: lm_loss(apply({"params": lora_jax.combine(t, frozen)}, ids), ids)
        loss, grads = jax.value_and_grad(loss_of)(t)
        updates, state = tx.update(grads, state, t)
        return optax.apply_updates(t, updates), state, loss

    linen = {"t": trainable, "s": tx.init(trainable)}

    def run_linen():
        linen["t"], linen["s"], loss = linen_step(linen["t"], frozen, linen["s"], ids)
        return loss

    # NNX: the same weights and the same factors (one core, same key)
    def nnx_model():
        m = nnx.eval_shape(lambda: nnx_gpt2.GPT2LMHeadModel(config, scan_layers=args.scan,
                                                            rngs=nnx.Rngs(0)))
        load(m, base, gpt2.LAYER_STACKS)
        return lnnx.inject(m, lora, jax.random.key(1))

    model_a = nnx_model()
    optimizer = nnx.Optimizer(model_a, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def nnx_step(model, optimizer, ids):
        loss_of = lambda m: lm_loss(m(ids), ids)
        loss, grads = nnx.value_and_grad(loss_of, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    model_b = nnx_model()
    graphdef, factors, rest = nnx.split(model_b, nnx.LoRAParam, ...)

    @jax.jit
    def functional_step(factors, rest, state, ids):
        # The module is rebuilt inside jit (pure pytrees in and out); nnx.value_and_grad,
        # because jax.grad around nnx.merge breaks nnx.scan's trace-level check.
        model = nnx.merge(graphdef, factors, rest)
        loss_of = lambda m: lm_loss(m(ids), ids)
        loss, grads = nnx.value_and_grad(loss_of, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        updates, state = tx.update(grads, state, factors)
        return optax.apply_updates(factors, updates), state, loss

    functional = {"f": factors, "s": tx.init(factors)}

    def run_functional():
        functional["f"], functional["s"], loss = functional_step(functional["f"], rest,
                                                                 functional["s"], ids)
        return loss

    first = {"linen": float(run_linen()), "nnx.jit": float(nnx_step(model_a, optimizer, ids)),
             "nnx functional": float(run_functional())}
    times = timed({"linen": run_linen,
                   "nnx.jit": lambda: nnx_step(model_a, optimizer, ids),
                   "nnx functional": run_functional}, args.iters)
    result = {
        "config": {**vars(args), "gpt2": SIZES[args.size]},
        "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                    "devices": len(jax.devices())},
        "first_step_loss": first,
        "step_seconds": times,
        "ratio_nnx_jit_over_linen": times["nnx.jit"] / times["linen"],
        "ratio_nnx_functional_over_linen": times["nnx functional"] / times["linen"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
