"""The seed document's comparison table, measured: full fine-tune vs LoRA (r 4/8/16) vs
prompt-tuning vs head-only, on the same model, data, steps and batch; and LoRA's variants at the
same rank (`dora-8`, `pissa-8`, `olora-8`, `loraplus-8`: LoRA+ with ratio 16).

(a) all-MiniLM-L6-v2 + BBC News topic classification: test accuracy.
(b) SmolLM2-135M + BBC News text, language modelling: held-out perplexity before -> after
    (LoRA on q_proj/v_proj; there is no head-only row, the LM head is the tied embedding).

Columns: trainable parameters and %, adapter file size (what the method must store besides the
base), memory of the compiled training step (XLA: arguments + outputs + temporaries), mean step
time after compilation, quality. Writes `compare_<part>.md`, `.json` and `.png` to --out-dir.

    python experiments/compare_methods.py --part minilm --steps 97 --seq-len 64
    python experiments/compare_methods.py --part smollm2 --steps 20 --seq-len 128 --batch-size 4
    python experiments/compare_methods.py --part minilm --methods lora-8,dora-8,pissa-8,loraplus-8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax.cli.adapter import save_adapter
from lora_jax.cli.finetune import encode_split
from lora_jax.cli.method import DEFAULT_LR, Setup, setup_method
from lora_jax.cli.model import Loaded, load_model
from lora_jax.train import data
from lora_jax.train import loop as train

PARTS = {
    "minilm": dict(model="minilm", task="classify", title="all-MiniLM-L6-v2",
                   methods=["full", "lora-4", "lora-8", "lora-16", "prompt", "head"]),
    "smollm2": dict(model="smollm2", task="lm", title="SmolLM2-135M-Instruct (GGUF Q4_1, "
                    "dequantized to float32)",
                    methods=["full", "lora-4", "lora-8", "lora-16", "prompt"]),
}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def compiled_step(setup: Setup, task: str, trainable: Any, frozen: Any, batch: Any
                  ) -> tuple[Any, int | None]:
    """The compiled training step and its memory (XLA: arguments + outputs + temporaries)."""
    step = train.make_step(setup.forward, task, setup.tx)
    compiled = step.lower(trainable, frozen, setup.tx.init(trainable), batch,
                          jax.random.key(0)).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return compiled, None
    return compiled, int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                         + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


# A variant label's LoRA options (setup_method keywords).
VARIANTS = {"lora": {}, "dora": {"dora": True}, "pissa": {"init": "pissa"},
            "olora": {"init": "olora"}, "loraplus": {"loraplus_ratio": 16.0}}


def run_method(loaded: Loaded, task: str, label: str, arrays: dict, args: argparse.Namespace
               ) -> dict[str, Any]:
    name, _, rank = label.partition("-")
    method = "lora" if name in VARIANTS else name
    lr = args.lr.get(name) or args.lr.get(method) or DEFAULT_LR[method]
    setup = setup_method(loaded, task, method, r=int(rank or 8), alpha=2 * int(rank or 8),
                             dropout=0.05, prompt_tokens=args.prompt_tokens, lr=lr,
                             steps=args.steps, seed=args.seed, **VARIANTS.get(name, {}))
    n_trainable, n_total = lora_jax.count_parameters(setup.params, setup.config)
    trainable, frozen = lora_jax.split(setup.params, setup.config)
    train_a, test_a = arrays["train"], arrays["test"]
    sample = {k: v[: args.batch_size] for k, v in train_a.items()}
    step, memory = compiled_step(setup, task, trainable, frozen, sample)
    # fit donates what it trains: copies keep the shared base (e.g. the new head) alive.
    result = train.fit(setup.forward, task, setup.tx, jax.tree.map(jnp.copy, trainable), frozen,
                       train.batches(train_a, args.batch_size, args.seed), steps=args.steps,
                       seed=args.seed, config=setup.config, progress=not args.no_progress,
                       step_fn=step)
    params = lora_jax.combine(result.trainable, frozen)
    quality = train.evaluate(setup.forward, task, params, test_a, args.eval_batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(Path(tmp) / "a", params, setup, loaded, task, method, args.prompt_tokens)
        size = folder_bytes(Path(tmp) / "a")
    row = {"method": label, "lr": lr, "trainable": n_trainable, "total": n_total,
           "trainable_percent": 100 * n_trainable / n_total, "adapter_bytes": size,
           "step_memory_bytes": memory, "step_seconds": result.step_seconds,
           "first_step_seconds": result.first_step_seconds, "losses": result.losses}
    row.update({f"test_{k}": v for k, v in quality.items()})
    print(f"{label}: {quality} step {result.step_seconds:.3f}s", flush=True)
    return row


def markdown(rows: list[dict], task: str, before: dict | None, header: str) -> str:
    quality = "test accuracy" if task == "classify" else "test perplexity (before -> after)"
    lines = [header, "", f"| method | trainable params | trainable % | adapter file | "
             f"step memory | step time | {quality} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if task == "classify":
            q = f"{100 * r['test_accuracy']:.1f}%"
        else:
            q = f"{before['perplexity']:.2f} -> {r['test_perplexity']:.2f}"
        nbytes = r["step_memory_bytes"]
        mem = "-" if nbytes is None else f"{nbytes / 2**20:,.0f} MiB"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['trainable_percent']:.3f}% | "
                     f"{r['adapter_bytes'] / 2**20:,.2f} MiB | {mem} | "
                     f"{1e3 * r['step_seconds']:,.0f} ms | {q} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], task: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        left.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], label=r["method"], lw=1)
        q = 100 * r["test_accuracy"] if task == "classify" else r["test_perplexity"]
        right.scatter(r["trainable"], q, s=40)
        right.annotate(r["method"], (r["trainable"], q), textcoords="offset points",
                       xytext=(4, 4), fontsize=8)
    left.set(xlabel="step", ylabel="training loss", title=title)
    left.legend(fontsize=8)
    right.set(xscale="log", xlabel="trainable parameters (log)",
              ylabel="test accuracy %" if task == "classify" else "test perplexity",
              title="quality vs trainable parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=PARTS, required=True)
    parser.add_argument("--methods", help="comma-separated subset, e.g. lora-8,head")
    parser.add_argument("--steps", type=int, default=97)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--limit-test", type=int, help="evaluate on this many test examples")
    parser.add_argument("--limit-train", type=int, help="train on this many examples / blocks")
    parser.add_argument("--lr", type=json.loads, default={},
                        help='per-method learning rates, e.g. \'{"full": 1e-4}\'')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out-dir", default="experiments/results")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    part = PARTS[args.part]
    loaded, task = load_model(part["model"], part["task"], 5)
    dataset = data.load_dataset("bbc", task)
    train_p, _, test_p = data.split(dataset, seed=args.seed)
    arrays = {name: encode_split(loaded, task, p.texts, p.labels, args.seq_len)
              for name, p in (("train", train_p), ("test", test_p))}
    for name, limit in (("train", args.limit_train), ("test", args.limit_test)):
        if limit:  # a seeded random subset: the splits are sorted by class
            keep = np.sort(np.random.default_rng(args.seed).permutation(
                len(arrays[name]["input_ids"]))[:limit])
            arrays[name] = {k: v[keep] for k, v in arrays[name].items()}
    before = None
    if task == "lm":
        base = setup_method(loaded, task, "head" if task == "classify" else "full")
        before = train.evaluate(base.forward, task, base.params, arrays["test"],
                                args.eval_batch_size)
        print(f"base model: {before}", flush=True)
    methods = args.methods.split(",") if args.methods else part["methods"]
    rows = [run_method(loaded, task, m, arrays, args) for m in methods]

    device = jax.devices()[0]
    header = (f"### {part['title']}, BBC News "
              f"{'topic classification' if task == 'classify' else 'language modelling'}\n\n"
              f"{args.steps} steps of batch {args.batch_size} x {args.seq_len} tokens, "
              f"{len(arrays['train']['input_ids'])} train / {len(arrays['test']['input_ids'])} "
              f"test {'examples' if task == 'classify' else 'blocks'}, seed {args.seed}, "
              f"AdamW with warm-up + cosine; {device.platform} ({device.device_kind}, "
              f"{os.cpu_count()} CPUs). Command: `python experiments/compare_methods.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}` "
              f"({time.perf_counter() - start:.0f} s in all).")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, task, before, header)
    (out / f"compare_{args.part}.md").write_text(table)
    (out / f"compare_{args.part}.json").write_text(json.dumps(
        {"argv": argv if argv is not None else sys.argv[1:], "before": before, "rows": rows,
         "device": device.device_kind, "seconds": time.perf_counter() - start}, indent=1))
    plot(rows, task, out / f"compare_{args.part}.png", f"{args.part}: training loss")
    print(table)


if __name__ == "__main__":
    main()
