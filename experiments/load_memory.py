"""Peak host memory of loading a model in float and quantized tensor by tensor as it is read
(`from_pretrained(..., quantize=)`, `load_gguf(..., quantize=)`), on SmolLM2's GGUF file and on
a larger random Llama saved as an HF folder: each load runs in its own process, which reports
its peak resident memory (VmHWM, reset after importing JAX and lora_jax) above what it held then,
and the bytes of the params it returned. Writes `<out>.json` and `<out>.md`.

    python experiments/load_memory.py --out experiments/results/load_memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# Run in a fresh process: the model (a .gguf file or an HF folder), param dtype and quantize.
CHILD = """
import json, sys
import jax, jax.numpy as jnp
from lora_jax.models import gguf, loading
path, dtype, quantize = sys.argv[1], jnp.dtype(sys.argv[2]), sys.argv[3]
quantize = None if quantize == "none" else quantize

def status(field):  # kB
    lines = open("/proc/self/status").read().splitlines()
    return int(next(line.split()[1] for line in lines if line.startswith(field + ":")))

jnp.zeros(1).block_until_ready()
with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) restarts from the current RSS
    f.write("5")
before = status("VmRSS")
if path.endswith(".gguf"):
    params = gguf.load_gguf(path, param_dtype=dtype, quantize=quantize).params
else:
    params = loading.from_pretrained(path, param_dtype=dtype, quantize=quantize)[1]
jax.block_until_ready(params)
nbytes = sum(x.size // 2 if x.dtype == jnp.uint4 else x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"peak_above_imports_mib": (status("VmHWM") - before) / 1024,
                  "params_mib": nbytes / 2**20}))
"""


def measure(path: str, dtype: str, quantize: str | None) -> dict[str, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, path, dtype, quantize or "none"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "seconds": time.perf_counter() - start}


def random_llama_folder(folder: str, width: int, layers: int) -> float:
    """A random Llama of `width` x `layers` (FFN 2.75 x width) written as an HF folder; its
    float32 MiB."""
    import jax
    import jax.numpy as jnp

    from lora_jax.models import llama, save_hf

    config = llama.Config(vocab_size=512, hidden_size=width, intermediate_size=width * 11 // 4,
                          num_hidden_layers=layers, num_attention_heads=width // 128)
    module = llama.build(config)
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    save_hf(folder, module, params)
    return sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20


def main() -> None:
    import tempfile

    from lora_jax.models.gguf import smollm2_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048, help="the random Llama's width")
    parser.add_argument("--layers", default="6,12",
                        help="the random Llamas' layer counts (comma-separated: one model each)")
    parser.add_argument("--out", default="experiments/results/load_memory")
    args = parser.parse_args()
    models = {"SmolLM2-135M Q4_1 GGUF": (str(smollm2_path()), [None, "nf4", "int8", "gguf"])}
    rows = [{"model": name, "param_dtype": dtype, "quantize": str(kind),
             **measure(path, dtype, kind)}
            for name, (path, kinds) in models.items()
            for dtype in ("float32", "bfloat16") for kind in kinds]
    for layers in map(int, args.layers.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            size = random_llama_folder(folder, args.width, layers)
            name = f"random Llama {args.width} x {layers} ({size:.0f} MiB float32 safetensors)"
            rows += [{"model": name, "param_dtype": dtype, "quantize": str(kind),
                      **measure(folder, dtype, kind)}
                     for dtype in ("float32", "bfloat16") for kind in (None, "nf4", "int8")]
    for row in rows:
        float_row = next(r for r in rows if r["model"] == row["model"] and
                         r["param_dtype"] == row["param_dtype"] and r["quantize"] == "None")
        row["peak / float peak"] = row["peak_above_imports_mib"] / float_row[
            "peak_above_imports_mib"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["Peak host memory of loading, one process per row: peak resident memory (VmHWM) "
             "above the process's after importing JAX and lora_jax. Command: "
             f"`python experiments/load_memory.py --width {args.width} --layers {args.layers}`.",
             "", "| model | param dtype | quantize | params MiB | peak MiB above imports | "
             "peak / float load's peak | s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['param_dtype']} | {r['quantize']} | {r['params_mib']:.1f} | "
              f"{r['peak_above_imports_mib']:.1f} | {r['peak / float peak']:.3f} | "
              f"{r['seconds']:.1f} |" for r in rows]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
