"""Training-step and inference timings of LoRA against its bounds, in one process, same batch.

Training (GPT-2, next-token loss, AdamW):
- full fine-tune: every weight gets a gradient and an Adam update;
- LoRA (r=8 on c_attn, `lora_jax.wrap`; split -> grad of the trainable half -> update ->
  combine, the one training idiom), and the same LoRA through the whole-tree
  `lora_jax.optimizer` (model-sized zero updates, every frozen weight rewritten each step);
- DoRA (the same LoRA with `use_dora=True`: a magnitude per output feature, the detached norm
  formed without an in x out product);
- frozen-base bound: forward + activation gradients, no weight gradients (the gradient of the
  loss with respect to the embedding output), which LoRA cannot beat;
- PyTorch eager + peft (same config, same batch) when torch, transformers and peft are installed.
Inference (forward logits): the adapter unmerged (`wrap`), merged (`lora_jax.merge`), the base.
Adapter sets (scanned GPT-2): a mixed batch over 8 adapters (example n uses adapter n mod 8) per
strategy against one adapter for the whole batch, and the compiled forward memory with 8 adapters
against 1 (the bound 1 + 7 x adapter / base means the base is never copied per adapter).
Sweeps: 8 LoRA points (seeds, learning rates, alphas) trained in one vmapped step
(`lora_jax.multi.sweep`) against 8 sequential runs of the same steps, compilation included and
excluded.

    python experiments/benchmark.py --size cpu                 # a small GPT-2, float32
    python experiments/benchmark.py --size small --dtype bfloat16 --batch 16 --seq 1024  # GPU
    python experiments/benchmark.py --size medium --dtype bfloat16 --batch 16 --seq 1024

Prints a table and writes JSON (--out). Times are medians over --iters calls after warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
import lora_jax.core.forward
from lora_jax.models import gpt2

SIZES = {
    "cpu": dict(n_embd=256, n_layer=4, n_head=4, vocab_size=8192, n_positions=1024),
    "small": dict(n_embd=768, n_layer=12, n_head=12),
    "medium": dict(n_embd=1024, n_layer=24, n_head=16),
}
TARGETS = ("c_attn",)


def timed(fns: dict[str, Callable[[], Any]], iters: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each `fn()` (which returns something to block on). The functions run
    in turn, round after round, so a load that drifts over time (a shared machine) hits them
    alike."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def compile_with_bytes(jitted: Any, *args: Any) -> tuple[Any, int | None]:
    """(the compiled function, its arguments + outputs + temporaries in bytes), the latter from
    XLA's memory analysis (None where the backend gives none)."""
    compiled = jitted.lower(*args).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return compiled, None
    return compiled, int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                         + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def jax_training(model: nn.Module, params: dict, ids: jax.Array, args: argparse.Namespace
                 ) -> dict[str, dict[str, Any]]:
    """Step time and compiled memory of full fine-tune, LoRA and the frozen-base bound."""
    tokens = ids.size
    results = {}
    tx = optax.adamw(1e-4)

    def whole_tree_step(apply_fn: Callable[..., Any], step_tx: Any, start: Any
                        ) -> tuple[Callable[[], Any], int | None]:
        """A step that differentiates and updates the whole params tree with `step_tx`."""

        @jax.jit
        def step(p, state, ids):
            loss, grads = jax.value_and_grad(lambda p: lm_loss(apply_fn({"params": p}, ids),
                                                               ids))(p)
            updates, state = step_tx.update(grads, state, p)
            return optax.apply_updates(p, updates), state, loss

        live = {"p": start, "s": step_tx.init(start)}
        fn, nbytes = compile_with_bytes(step, live["p"], live["s"], ids)

        def run():
            live["p"], live["s"], loss = fn(live["p"], live["s"], ids)
            return loss

        return run, nbytes

    # Full fine-tune.
    run_full, full_bytes = whole_tree_step(model.apply, tx, params)
    runners = {"full fine-tune": run_full}
    results["full fine-tune"] = {"bytes": full_bytes}

    # LoRA and DoRA: split -> grad of the trainable half -> update -> combine.
    def split_step(config: lora_jax.LoraConfig) -> tuple[Callable[[], Any], int | None, Any]:
        adapted = lora_jax.inject(params, config, jax.random.key(1),
                                  layouts=lora_jax.layouts(model, ids[:1, :8]))
        trainable, frozen = lora_jax.split(adapted, config)
        apply = lora_jax.wrap(model.apply, config)

        @jax.jit
        def step(t, frozen, state, ids):
            def loss_of(t):
                return lm_loss(apply({"params": lora_jax.combine(t, frozen)}, ids), ids)

            loss, grads = jax.value_and_grad(loss_of)(t)
            updates, state = tx.update(grads, state, t)
            return optax.apply_updates(t, updates), state, loss

        live = {"t": trainable, "s": tx.init(trainable)}
        fn, nbytes = compile_with_bytes(step, live["t"], frozen, live["s"], ids)

        def run():
            live["t"], live["s"], loss = fn(live["t"], frozen, live["s"], ids)
            return loss

        return run, nbytes, (live, frozen, adapted, apply)

    config = lora_jax.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS)
    runners["LoRA"], lora_bytes, (lora, frozen, lora_params, apply) = split_step(config)
    results["LoRA"] = {"bytes": lora_bytes}
    dora_config = lora_jax.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS,
                                      use_dora=True)
    runners["DoRA"], dora_bytes, _ = split_step(dora_config)
    results["DoRA"] = {"bytes": dora_bytes}

    # The same LoRA through the whole-tree optimizer (the idiom lora_jax does not recommend).
    run_whole, whole_bytes = whole_tree_step(apply, lora_jax.optimizer(tx, lora_params, config),
                                             lora_params)
    runners["LoRA, whole-tree optimizer"] = run_whole
    results["LoRA, whole-tree optimizer"] = {"bytes": whole_bytes}

    # Frozen-base bound: d loss / d (embedding output), weights constant.
    def with_delta(delta):
        def add(next_fun, a, kw, context):
            out = next_fun(*a, **kw)
            if (context.method_name == "__call__" and isinstance(context.module, nn.Embed)
                    and context.module.name == "wte"):
                return out + delta.astype(out.dtype)
            return out

        with nn.intercept_methods(add):
            return lm_loss(model.apply({"params": params}, ids), ids)

    @jax.jit
    def frozen_step(params_, ids):
        del params_  # passed so the weights are arguments, as in the other steps
        delta = jnp.zeros((*ids.shape, model.config.n_embd), jnp.float32)
        return jax.value_and_grad(with_delta)(delta)

    frozen_fn, frozen_bytes = compile_with_bytes(frozen_step, params, ids)
    runners["frozen-base bound"] = lambda: frozen_fn(params, ids)
    results["frozen-base bound"] = {"bytes": frozen_bytes}
    for mode, seconds in timed(runners, args.iters).items():
        results[mode].update(step_s=seconds, tokens_per_s=tokens / seconds)
    return results, config, lora["t"], frozen


def jax_inference(model: nn.Module, params: dict, config: lora_jax.LoraConfig, trainable: dict,
                  frozen: dict, ids: jax.Array, args: argparse.Namespace) -> dict[str, Any]:
    """Forward time of the base, the merged and the unmerged adapter (non-zero B)."""
    # A trained-looking adapter: B != 0, so the unmerged path does real work.
    adapted = lora_jax.combine(trainable, frozen)
    adapted = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.01 if path[-1].key == "lora_B" else x, adapted)
    merged = lora_jax.merge(adapted, config)
    apply = lora_jax.wrap(model.apply, config)
    base_fwd = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    lora_fwd = jax.jit(lambda p, ids: apply({"params": p}, ids))
    out = timed({"base": lambda: base_fwd(params, ids), "merged": lambda: base_fwd(merged, ids),
                 "unmerged": lambda: lora_fwd(adapted, ids)}, args.iters)
    diff = float(jnp.abs(base_fwd(merged, ids).astype(jnp.float32)
                         - lora_fwd(adapted, ids).astype(jnp.float32)).max())
    return {"seconds": out, "max_abs_diff_merged_vs_unmerged": diff}


def adapter_sets(config: gpt2.Config, ids: jax.Array, args: argparse.Namespace,
                 k: int = 8) -> dict[str, Any]:
    """A mixed batch (example n uses adapter n mod K) on a scanned GPT-2 for each strategy,
    against one adapter for the whole batch (same batch, same rank); and the compiled memory
    of the forward with K adapters against one (the base must not be copied per adapter)."""
    from lora_jax.multi import adapters

    model = gpt2.build(config, dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.dtype),
                       scan_layers=True)
    base = model.init(jax.random.key(0), ids[:1, :8])["params"]
    shapes = lora_jax.layouts(model, ids[:1, :8])
    lora = lora_jax.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=list(TARGETS),
                               init_lora_weights=False)
    members = {f"a{i}": (lora_jax.inject(base, lora, jax.random.key(i), layouts=shapes), lora)
               for i in range(k)}
    full, one = adapters.adapter_set(members), adapters.adapter_set({"a0": members["a0"]})
    batch_ids = jnp.arange(ids.shape[0], dtype=jnp.int32) % k
    single = jax.jit(lambda p, x: lora_jax.wrap(model.apply, lora)({"params": p}, x))
    fns = {"single adapter": lambda: single(members["a0"][0], ids)}
    results: dict[str, Any] = {}
    for strategy in lora_jax.core.forward.STRATEGIES:
        apply = lora_jax.wrap(model.apply, lora, strategy=strategy)
        mixed = jax.jit(lambda p, x, i, apply=apply: apply({"params": p}, x, adapter_ids=i))
        _, bytes_k = compile_with_bytes(mixed, full.params, ids, batch_ids)
        _, bytes_1 = compile_with_bytes(mixed, one.params, ids, jnp.zeros_like(batch_ids))
        fns[f"{strategy}, {k} adapters"] = lambda mixed=mixed: mixed(full.params, ids, batch_ids)
        results[strategy] = {"bytes_k": bytes_k, "bytes_1": bytes_1}
    seconds = timed(fns, args.iters)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    adapter_bytes = nbytes(lora_jax.split(members["a0"][0], lora)[0])
    for strategy in lora_jax.core.forward.STRATEGIES:
        r = results[strategy]
        r["forward_s"] = seconds[f"{strategy}, {k} adapters"]
        r["forward / single adapter"] = r["forward_s"] / seconds["single adapter"]
        if r["bytes_k"] is not None:
            r["memory K / memory 1"] = r["bytes_k"] / r["bytes_1"]
    return {"k": k, "single_adapter_s": seconds["single adapter"], "strategies": results,
            "base_bytes": nbytes(base), "adapter_bytes": adapter_bytes,
            "bound: 1 + (K-1) x adapter / base": 1 + (k - 1) * adapter_bytes / nbytes(base)}


def sweep_vs_sequential(model: nn.Module, params: dict, ids: jax.Array,
                        args: argparse.Namespace, k: int = 8, steps: int = 10) -> dict[str, Any]:
    """Wall time of a K-point sweep (`lora_jax.multi.sweep`: seeds, learning rates and alphas; one
    vmapped step on one base) against K sequential runs of the same `steps` with the
    single-adapter step (each compiles its own), compilation included and excluded."""
    from lora_jax.multi import sweep
    from lora_jax.train import loop as train

    config = lora_jax.LoraConfig(r=args.r, target_modules=list(TARGETS))
    points = [{"seed": i, "lr": 1e-4 * (1 + i), "lora_alpha": 2 * args.r * (1 + i % 2)}
              for i in range(k)]
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    tx = lambda lr: optax.adamw(lr)

    def timed_steps(step: Callable[[int], Any]) -> tuple[float, float]:
        """(all steps, the steps after the first) in seconds."""
        start = time.perf_counter()
        jax.block_until_ready(step(0))
        first = time.perf_counter()
        for i in range(1, steps):
            out = step(i)
        jax.block_until_ready(out)
        end = time.perf_counter()
        return end - start, end - first

    def forward_of(lora: lora_jax.LoraConfig) -> Callable[..., Any]:
        apply = lora_jax.wrap(model.apply, lora)
        return lambda p, b, key: apply({"params": p}, b["input_ids"])

    total, steady = 0.0, 0.0
    for point in points:  # the sequential runs
        lora = sweep.point_config(config, point)
        trainable, frozen = lora_jax.split(
            lora_jax.inject(params, lora, jax.random.key(point["seed"])), lora)
        step_fn = train.make_step(forward_of(lora), "lm", tx(point["lr"]))
        live = [trainable, tx(point["lr"]).init(trainable)]

        def one(i: int, step_fn=step_fn, live=live, frozen=frozen) -> Any:
            live[0], live[1], loss = step_fn(live[0], frozen, live[1], batch,
                                             jax.random.key(i))
            return loss

        run_total, run_steady = timed_steps(one)
        total, steady = total + run_total, steady + run_steady

    sw = sweep.sweep(params, config, points)
    step_fn = sweep.make_step(forward_of(sw.config), "lm", tx)
    live = [sw.trainable, sweep.init_state(sw, tx)]

    def all_points(i: int) -> Any:
        live[0], live[1], losses = step_fn(live[0], sw.scales, sw.frozen, live[1], batch,
                                           sweep.dropout_keys(sw, i))
        return losses

    sweep_total, sweep_steady = timed_steps(all_points)
    return {"k": k, "steps": steps, "sequential_s": total, "sequential_steady_s": steady,
            "sweep_s": sweep_total, "sweep_steady_s": sweep_steady,
            "sweep / sequential (compile included)": sweep_total / total,
            "sweep / sequential (compile excluded)": sweep_steady / steady}


def torch_training(hf_config: dict, ids: np.ndarray, args: argparse.Namespace
                   ) -> dict[str, Any] | None:
    """PyTorch eager step times (full fine-tune and peft LoRA), or None without torch/peft."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    config = transformers.GPT2Config(**hf_config, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, attn_implementation="sdpa")
    batch = torch.as_tensor(ids, dtype=torch.long, device=device)
    runners = {}
    for mode in ("full fine-tune", "LoRA"):
        model = transformers.GPT2LMHeadModel(config).to(device=device, dtype=dtype)
        if mode == "LoRA":
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=args.r, lora_alpha=2 * args.r, target_modules=list(TARGETS),
                fan_in_fan_out=True))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run(model=model, opt=opt):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            return loss.detach().cpu().numpy()

        runners[mode] = run
    out = {mode: {"step_s": seconds, "tokens_per_s": ids.size / seconds}
           for mode, seconds in timed(runners, args.iters).items()}
    if device == "cuda":  # peak of the two together: both models live during the timing
        out["peak_bytes_both"] = torch.cuda.max_memory_allocated()
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute and base-weight dtype (LoRA factors stay float32)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default="experiments/results/benchmark.json")
    args = parser.parse_args(argv)

    hf_config = SIZES[args.size]
    config = gpt2.config_from_hf(hf_config)
    dtype = jnp.dtype(args.dtype)
    model = gpt2.build(config, dtype=dtype, param_dtype=dtype)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, config.vocab_size)
    params = model.init(jax.random.key(0), ids[:1, :8])["params"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    device = jax.devices()[0]
    print(f"GPT-2 {args.size} ({n_params / 1e6:.1f}M params), batch {args.batch} x {args.seq}, "
          f"{args.dtype}, LoRA r={args.r} on {list(TARGETS)}, device {device.device_kind}")

    training, lora_config, trainable, frozen = jax_training(model, params, ids, args)
    inference = jax_inference(model, params, lora_config, trainable, frozen, ids, args)
    sets = adapter_sets(config, ids, args)
    sweeps = sweep_vs_sequential(model, params, ids, args)
    torch_results = None if args.no_torch else torch_training(hf_config, np.asarray(ids), args)

    inf = inference["seconds"]
    ratios = {
        "lora_step / frozen_bound": training["LoRA"]["step_s"]
        / training["frozen-base bound"]["step_s"],
        "lora_step / full_step": training["LoRA"]["step_s"] / training["full fine-tune"]["step_s"],
        "dora_step / lora_step": training["DoRA"]["step_s"] / training["LoRA"]["step_s"],
        "dora memory / lora memory": training["DoRA"]["bytes"] / training["LoRA"]["bytes"],
        "whole-tree optimizer step / split step": training["LoRA, whole-tree optimizer"][
            "step_s"] / training["LoRA"]["step_s"],
        "whole-tree optimizer memory / split memory": training["LoRA, whole-tree optimizer"][
            "bytes"] / training["LoRA"]["bytes"],
        "merged / base (inference)": inf["merged"] / inf["base"],
        "unmerged / base (inference)": inf["unmerged"] / inf["base"],
    }
    for strategy, r in sets["strategies"].items():
        ratios[f"mixed batch, {sets['k']} adapters, {strategy} / one adapter"] = \
            r["forward / single adapter"]
        if "memory K / memory 1" in r:
            ratios[f"forward memory, {sets['k']} adapters / one ({strategy}; bound "
                   f"{sets['bound: 1 + (K-1) x adapter / base']:.3f})"] = r["memory K / memory 1"]
    for when in ("included", "excluded"):
        ratios[f"{sweeps['k']}-point sweep / {sweeps['k']} sequential runs, {sweeps['steps']} "
               f"steps (compile {when})"] = sweeps[f"sweep / sequential (compile {when})"]
    if torch_results:
        ratios["jax LoRA tokens/s / torch+peft LoRA tokens/s"] = (
            training["LoRA"]["tokens_per_s"] / torch_results["LoRA"]["tokens_per_s"])

    rows = [("JAX", mode, r["step_s"], r["tokens_per_s"], r["bytes"])
            for mode, r in training.items()]
    if torch_results:
        rows += [("PyTorch eager", f"{mode}{' (peft)' if mode == 'LoRA' else ''}",
                  torch_results[mode]["step_s"], torch_results[mode]["tokens_per_s"], None)
                 for mode in ("full fine-tune", "LoRA")]
    lines = [f"GPT-2 {args.size} ({n_params / 1e6:.1f}M params), batch {args.batch} x "
             f"{args.seq}, {args.dtype}, LoRA r={args.r} on {list(TARGETS)}, "
             f"{device.platform} ({device.device_kind}); medians of {args.iters} calls",
             "", "| system | training | step ms | tokens/s | memory MiB |", "|---|---|---|---|---|"]
    for system, mode, step_s, tps, nbytes in rows:
        mem = "-" if nbytes is None else f"{nbytes / 2**20:,.0f}"
        lines.append(f"| {system} | {mode} | {1e3 * step_s:.1f} | {tps:,.0f} | {mem} |")
    lines += ["", "| inference | forward ms |", "|---|---|"]
    lines += [f"| {mode} | {1e3 * seconds:.2f} |" for mode, seconds in inf.items()]
    lines += ["", "| ratio | measured |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
    lines += ["", "JAX memory: XLA's compiled arguments + outputs + temporaries of the step. "
              "PyTorch: JSON `peak_bytes_both` on a GPU (both models together)."]
    print("\n".join(lines))

    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                        else sys.argv[1:])]),
        "size": args.size, "gpt2_config": hf_config, "params": n_params,
        "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "r": args.r,
        "device": device.device_kind, "platform": device.platform,
        "host": platform.node(), "jax": jax.__version__,
        "training": training, "inference": inference, "adapter_sets": sets, "sweep": sweeps,
        "torch": torch_results, "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    command = f"Command: `python experiments/{report['command']}`"
    Path(args.out).with_suffix(".md").write_text("\n".join([command, "", *lines]) + "\n")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
