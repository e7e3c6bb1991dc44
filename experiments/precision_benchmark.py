"""bf16 against float32, and gradient accumulation against one large batch, in the training step
`lora-jax finetune` runs (`lora_jax.train.loop.make_step`: split, differentiate the trainable
half, AdamW with the CLI's clipping and schedule, combine), on a real-shaped GPT-2.

- precision: `--dtype bfloat16 --param-dtype bfloat16` (bf16 compute and frozen base; float32
  LoRA factors and optimizer state) against float32, same batch: step time and XLA's compiled
  memory (arguments + outputs + temporaries);
- accumulation: `--grad-accum 4` at batch b (one compiled step, a scan over 4 micro-batches)
  against one step at batch 4b: step time and compiled memory, and their losses (equal).

    python experiments/precision_benchmark.py                      # GPT-2 "cpu" size, CPU
    python experiments/precision_benchmark.py --size small --batch 8 --seq 1024   # a GPU

Prints a table of times, memory and ratios, and writes it as Markdown and JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax.cli.method import training_tx
from lora_jax.models import gpt2
from lora_jax.train import loop as train

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import SIZES, TARGETS, compile_with_bytes, timed  # noqa: E402


def setup(size: str, dtype: str, r: int, steps: int) -> tuple[Any, Any, Any, Any]:
    """(forward, trainable, frozen, tx) of LoRA on a random GPT-2 of `size` in `dtype`."""
    config = gpt2.config_from_hf(SIZES[size])
    model = gpt2.build(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    lora = lora_jax.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    trainable, frozen = lora_jax.split(lora_jax.inject(params, lora, jax.random.key(1)), lora)
    apply = lora_jax.wrap(model.apply, lora)

    def forward(p: Any, batch: Any, key: Any) -> Any:
        return apply({"params": p}, batch["input_ids"], batch["attention_mask"])

    return forward, trainable, frozen, training_tx(1e-3, steps)


def step_runner(forward: Any, trainable: Any, frozen: Any, tx: Any, batch: Any, accum: int
                ) -> tuple[Any, int | None, float]:
    """(run one step, compiled bytes, the first step's loss) of the CLI's step."""
    step = train.make_step(forward, "lm", tx, accum)
    live = [jax.tree.map(jnp.copy, trainable), tx.init(trainable)]
    key = jax.random.key(0)
    fn, nbytes = compile_with_bytes(step, live[0], frozen, live[1], batch, key)
    first = float(fn(jax.tree.map(jnp.copy, trainable), frozen, tx.init(trainable), batch,
                     key)[2])

    def run() -> Any:
        live[0], live[1], loss = fn(live[0], frozen, live[1], batch, key)
        return loss

    return run, nbytes, first


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="cpu")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch b")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="experiments/results/precision_benchmark_cpu")
    args = parser.parse_args(argv)

    k, b = args.accum, args.batch
    vocab = gpt2.config_from_hf(SIZES[args.size]).vocab_size
    ids = np.asarray(jax.random.randint(jax.random.key(0), (k * b, args.seq), 0, vocab))
    big = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    small = {name: v[:b] for name, v in big.items()}
    runs: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        forward, trainable, frozen, tx = setup(args.size, dtype, args.r, 100)
        runs[f"{dtype}, batch {b}"] = step_runner(forward, trainable, frozen, tx, small, 1)
        if dtype == "float32":
            runs[f"float32, batch {k * b}"] = step_runner(forward, trainable, frozen, tx, big, 1)
            runs[f"float32, {k} x {b} accumulated"] = step_runner(forward, trainable, frozen,
                                                                  tx, big, k)
    seconds = timed({name: run for name, (run, _, _) in runs.items()}, args.iters)
    rows = {name: {"step_seconds": seconds[name], "compiled_bytes": nbytes, "first_loss": loss}
            for name, (_, nbytes, loss) in runs.items()}
    f32, bf16 = rows[f"float32, batch {b}"], rows[f"bfloat16, batch {b}"]
    one, acc = rows[f"float32, batch {k * b}"], rows[f"float32, {k} x {b} accumulated"]

    def ratio(a: dict[str, Any], c: dict[str, Any], key: str) -> float | None:
        return None if a[key] is None or c[key] is None else a[key] / c[key]

    ratios = {
        "bf16 / float32 step time": ratio(bf16, f32, "step_seconds"),
        "bf16 / float32 compiled memory": ratio(bf16, f32, "compiled_bytes"),
        f"accumulated ({k} x {b}) / one batch of {k * b}: step time":
            ratio(acc, one, "step_seconds"),
        f"accumulated ({k} x {b}) / one batch of {k * b}: compiled memory":
            ratio(acc, one, "compiled_bytes"),
        "accumulated vs one batch: first-step loss, relative difference":
            abs(acc["first_loss"] - one["first_loss"]) / abs(one["first_loss"]),
    }
    device = jax.devices()[0]
    n_params = sum(x.size for x in jax.tree.leaves(setup(args.size, "float32", args.r, 1)[2]))
    title = (f"GPT-2 {args.size} ({n_params / 1e6:.1f}M frozen params), LoRA r={args.r} on "
             f"{list(TARGETS)}, seq {args.seq}, {device.platform} ({device.device_kind}, "
             f"{platform.machine()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
             f"cores), medians of {args.iters} steps")
    lines = [f"# Precision and accumulation: {title}", "",
             "| step | seconds | compiled MiB |", "|---|---|---|"]
    mib = lambda n: "-" if n is None else f"{n / 2**20:.1f}"
    lines += [f"| {name} | {row['step_seconds']:.4f} | {mib(row['compiled_bytes'])} |"
              for name, row in rows.items()]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {'-' if v is None else f'{v:.3g}'} |" for name, v in ratios.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"title": title, "rows": rows, "ratios": ratios, "args": vars(args)}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table)
    return result


if __name__ == "__main__":
    main()
