"""Instruction data (supervised fine-tuning): jsonl of `{"prompt", "completion"}` or
`{"messages": [{"role", "content"}, ...]}` lines, tokenized with the loss on the completion /
assistant tokens only, one example per row or packed into rows of `seq_len` (the formats and
packing: docs/guides/cli.md).

Arrays (int32 [N, seq_len]): `input_ids`, `attention_mask`, and `loss_mask`, 1 on a token that
is trained and predicted from its own example (the `lm` loss weights token t by `loss_mask[t]`);
packed rows add `segment_ids` (1, 2, ... per example, 0 on padding).

>>> examples = [(np.array([5, 6, 7]), np.array([0, 1, 1])), (np.array([8, 9]), np.array([0, 1]))]
>>> packed = pack(examples, seq_len=6)
>>> packed["segment_ids"].tolist(), packed["loss_mask"].tolist()
([[1, 1, 1, 2, 2, 0]], [[0, 1, 1, 0, 1, 0]])
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.train.chat import ChatTemplate
from lora_jax.train.data import TextDataset, jsonl_rows, unpadded_tokenizer

ROLES = ("system", "user", "assistant", "tool")
Example = tuple[np.ndarray, np.ndarray]  # token ids, trained (0/1), one example


def instruction_format(path: str | Path) -> str | None:
    """"pairs" (prompt / completion) or "messages" when the first line of the jsonl file is
    such a record, else None (a `{"text", "label"}` file)."""
    row = next((row for _, row in jsonl_rows(path)), None)
    if isinstance(row, dict) and "messages" in row:
        return "messages"
    if isinstance(row, dict) and ("prompt" in row or "completion" in row):
        return "pairs"
    return None


def read_instructions(path: str | Path) -> TextDataset:
    """The examples of an instruction jsonl file: prompts as `texts` and completions as
    `targets`, or conversations as `messages`. A bad line is a ValueError naming it."""
    rows = ((f"{path}:{number}", row) for number, row in jsonl_rows(path))
    data = instructions(instruction_format(path), rows)
    if not len(data):
        raise ValueError(f"{path} holds no examples")
    return data


def instructions(kind: str | None, rows: Iterable[tuple[str, Any]]) -> TextDataset:
    """The examples of (where, row) jsonl rows of `kind` ("pairs", else conversations: what
    `instruction_format` says); a bad row is a ValueError starting with its `where`."""
    prompts, completions, conversations = [], [], []
    for where, row in rows:
        if kind == "pairs":
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str)
                                                    for k in ("prompt", "completion")):
                raise ValueError(f'{where}: expected an object with string "prompt" and '
                                 '"completion" fields, as the first line has')
            if not row["completion"].strip():
                raise ValueError(f"{where}: the completion is empty: nothing to train on")
            prompts.append(row["prompt"])
            completions.append(row["completion"])
        else:
            conversations.append(_conversation(row, where))
    if kind == "pairs":
        return TextDataset(tuple(prompts), targets=tuple(completions))
    return TextDataset((), messages=tuple(conversations))


def _conversation(row: Any, where: str) -> tuple[dict[str, str], ...]:
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'{where}: expected an object with a non-empty "messages" list, as '
                         "the first line has")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f'{where}: message {i} needs a string "role" and "content"')
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}: message {i} has role {json.dumps(m.get('role'))}; "
                             f"use one of {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError(f"{where}: no assistant message with content: nothing to train on")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def tokenize(tokenizer: Any, data: TextDataset, eos_id: int | None,
             template: ChatTemplate | None = None) -> list[Example]:
    """(ids, trained) of each example of `data` (`read_instructions`): pieces tokenized one by
    one without special tokens; EOS appended (trained) unless the last trained piece holds it.
    Conversations need the model's chat `template`."""
    if data.messages is not None:
        if template is None:
            raise ValueError("chat data (\"messages\") needs the model's chat template: the "
                             "model folder has no chat_template in tokenizer_config.json nor a "
                             "chat_template.jinja; add one, or write prompt/completion lines")
        pieces = [template.pieces(m) for m in data.messages]
    else:
        assert data.targets is not None, "not instruction data: see read_instructions"
        pieces = [[(p, False), (c, True)] for p, c in zip(data.texts, data.targets, strict=True)]
    flat = [text for example in pieces for text, _ in example]
    encoded = iter(unpadded_tokenizer(tokenizer).encode_batch(flat, add_special_tokens=False))
    out = []
    for example in pieces:
        ids: list[int] = []
        trained: list[int] = []
        last: list[int] = []
        for _, is_trained in example:
            piece = next(encoded).ids
            ids += piece
            trained += [int(is_trained)] * len(piece)
            last = piece if is_trained else last
        if eos_id is not None and eos_id not in last:
            ids.append(eos_id)
            trained.append(1)
        out.append((np.asarray(ids, np.int32), np.asarray(trained, np.int32)))
    return out


def rows(examples: Sequence[Example], seq_len: int, pad: int = 0) -> dict[str, np.ndarray]:
    """One example per row: truncated to `seq_len`, right-padded with `pad`."""
    out = _fill(examples, [[i] for i in range(len(examples))], seq_len, pad)
    del out["segment_ids"]
    return out


def pack(examples: Sequence[Example], seq_len: int, pad: int = 0) -> dict[str, np.ndarray]:
    """Examples (each truncated to `seq_len`) packed into rows of `seq_len`, first fit in data
    order, with `segment_ids` numbering the examples of each row from 1 (0: padding)."""
    space = np.zeros(len(examples), np.int64)  # room left in each row (at most one per example)
    placed: list[list[int]] = []  # example indices of each row
    for i, (ids, _) in enumerate(examples):
        k = min(len(ids), seq_len)
        fits = space[: len(placed)] >= k
        row = int(fits.argmax()) if fits.any() else len(placed)
        if row == len(placed):
            space[row] = seq_len
            placed.append([])
        space[row] -= k
        placed[row].append(i)
    return _fill(examples, placed, seq_len, pad)


def _fill(examples: Sequence[Example], placed: list[list[int]], seq_len: int, pad: int
          ) -> dict[str, np.ndarray]:
    """The arrays of rows whose examples (truncated to `seq_len`) are `placed[row]`, in order."""
    out = {k: np.full((len(placed), seq_len), pad if k == "input_ids" else 0, np.int32)
           for k in ("input_ids", "attention_mask", "loss_mask", "segment_ids")}
    for row, members in enumerate(placed):
        start = 0
        for segment, i in enumerate(members, 1):
            ids, trained = examples[i]
            k = min(len(ids), seq_len)
            span = slice(start, start + k)
            out["input_ids"][row, span] = ids[:k]
            out["attention_mask"][row, span] = 1
            # The example's first token stays 0: nothing in the example predicts it.
            out["loss_mask"][row, start + 1:start + k] = trained[1:k]
            out["segment_ids"][row, span] = segment
            start += k
    return out
