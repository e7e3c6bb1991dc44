"""Instruction tuning on real data: BBC News headlines as chat (user: which section is this
headline from; assistant: the section), for `lora-jax finetune` on SmolLM2-135M-Instruct.

Writes the jsonl and prints how the examples fill rows, one per row and packed (with the model's
chat template and tokenizer). Then, as in experiments/results/sft_bbc.md:

    python experiments/sft_bbc.py --out /tmp/bbc_chat.jsonl
    lora-jax finetune --model smollm2 --data /tmp/bbc_chat.jsonl --limit 120 --seq-len 96 \\
        --batch-size 8 --steps 15 --out runs/sft_unpacked
    lora-jax finetune --model smollm2 --data /tmp/bbc_chat.jsonl --limit 120 --packing \\
        --seq-len 256 --batch-size 2 --steps 15 --out runs/sft_packed
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from lora_jax.cli.finetune import encode_instructions
from lora_jax.cli.model import load_model
from lora_jax.train import data

QUESTION = ("Which BBC News section is this headline from (business, entertainment, politics, "
            "sport or tech)?\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/bbc_chat.jsonl")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[96, 256, 1024])
    args = parser.parse_args()
    bbc = data.load_bbc()
    with open(args.out, "w", encoding="utf-8") as f:
        for text, label in zip(bbc.texts, bbc.labels, strict=True):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": QUESTION + text.splitlines()[0].strip()},
                {"role": "assistant", "content": bbc.classes[label]}]}) + "\n")
    loaded, _ = load_model("smollm2", "lm")
    examples = data.load_dataset(args.out, "lm")
    print(f"wrote {args.out}: {len(examples)} conversations")
    for seq_len in args.seq_len:
        rows = encode_instructions(loaded, examples, seq_len, packing=False)
        packed = encode_instructions(loaded, examples, seq_len, packing=True)
        trained = int(rows["loss_mask"].sum())
        assert trained == int(packed["loss_mask"].sum())
        print(f"--seq-len {seq_len}: {len(rows['input_ids'])} rows (real tokens "
              f"{np.mean(rows['attention_mask']):.3f}) -> packed {len(packed['input_ids'])} rows "
              f"({np.mean(packed['attention_mask']):.3f}); {trained} trained tokens either way")


if __name__ == "__main__":
    main()
