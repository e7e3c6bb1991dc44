"""Streamed training data (`lora-jax finetune --stream`): a .txt or .jsonl file read line by line
as training goes, each process reading only its share, tokenized into rows of `--seq-len`,
shuffled in a bounded seeded buffer, deterministic. Row j of every global batch comes from lane
j, the j-th of `lanes` equal byte ranges of the file (a line belongs to the range that holds its
first byte); a resume replays the lanes up to its step (docs/guides/cli.md, "Streamed data").

>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "notes.txt"
>>> _ = path.write_bytes(b"one\\ntwo\\nthree\\n")
>>> [line for _, line in lines(path, 0, 5)], [line for _, line in lines(path, 5, 14)]
([b'one\\n', b'two\\n'], [b'three\\n'])
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.train import data

CHUNK = 64  # records tokenized together
Rows = dict[str, np.ndarray]  # equal-length int32 [N, seq_len] arrays, as `encode_split` gives
Record = tuple[str, Any]  # (where in the file, for errors; a document's text or a jsonl value)
# A lane's chunks of records -> its rows, chunk after chunk (may carry tokens between chunks).
Encode = Callable[[Iterator[list[Record]]], Iterator[Rows]]


def lines(path: Path, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of each line of `path` whose first byte is in [start, stop), read
    one at a time."""
    with open(path, "rb") as file:
        offset = start
        if start > 0:  # the line holding byte start - 1 is the previous range's
            file.seek(start - 1)
            offset = start - 1 + len(file.readline())
        while offset < stop:
            line = file.readline()
            if not line:
                return
            yield offset, line
            offset += len(line)


def records(path: Path, start: int, stop: int) -> Iterator[Record]:
    """The records whose first line starts in [start, stop): a .jsonl file's non-blank lines as
    JSON values, a text file's documents (lines up to a blank line) as text. `where` names the
    file and the record's first byte."""
    document: list[str] = []
    where = ""
    for offset, raw in lines(path, start, stop):
        if path.suffix == ".jsonl":
            value = data.jsonl_value(raw, f"{path} (byte {offset})")
            if value is not None:
                yield f"{path} (byte {offset})", value
            continue
        line = raw.decode("utf-8", errors="replace")
        if line.strip():
            where = where if document else f"{path} (byte {offset})"
            document.append(line)
        elif document:
            yield where, "".join(document).strip()
            document = []
    if document:
        yield where, "".join(document).strip()


def text_blocks(tokenizer: Any, seq_len: int, eos_id: int | None, jsonl: bool) -> Encode:
    """`Encode` of plain text (language modelling): the records' texts (a jsonl row's "text"
    field) tokenized as `data.lm_blocks` does, each followed by `eos_id`, cut into rows of
    `seq_len`; the tokens left over carry into the next chunk."""
    tokenizer = data.unpadded_tokenizer(tokenizer)

    def encode(chunks: Iterator[list[Record]]) -> Iterator[Rows]:
        carry = np.zeros(0, np.int32)
        for chunk in chunks:
            texts = [data.text_field(v, w) if jsonl else v for w, v in chunk]
            tokens = np.concatenate([carry, data.lm_tokens(tokenizer, texts, eos_id)])
            n = len(tokens) // seq_len
            blocks, carry = tokens[: n * seq_len].reshape(n, seq_len), tokens[n * seq_len:]
            yield {"input_ids": blocks, "attention_mask": np.ones_like(blocks)}

    return encode


def shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """`items` in a shuffled order, holding at most `size` of them: each item read replaces a
    random one of the buffer, which is given out; the buffer's last items come out in random
    order.

    >>> list(shuffled(iter(range(6)), 3, np.random.default_rng(0)))
    [2, 1, 4, 5, 3, 0]
    """
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


@dataclasses.dataclass(frozen=True)
class Stream:
    """The streamed training data of a run: the file, its `lanes` (rows per global batch), the
    seed, how records become rows (`encode`), and each lane's shuffle buffer (rows)."""

    path: Path
    lanes: int
    seed: int
    encode: Encode
    shuffle: int = 256

    def batches(self, rows: slice, start_step: int = 0) -> Iterator[Rows]:
        """This process's rows `rows` of each global batch, from step `start_step` on (endless):
        int32 [rows.stop - rows.start, seq_len] arrays; only those lanes are read."""
        lanes = [self.lane(j) for j in range(rows.start, rows.stop)]
        for _ in range(start_step):
            for lane in lanes:
                next(lane)
        while True:
            batch = [next(lane) for lane in lanes]
            yield {k: np.stack([row[k] for row in batch]) for k in batch[0]}

    def lane(self, index: int) -> Iterator[Rows]:
        """Lane `index`'s rows, one at a time, epoch after epoch; a lane whose range holds no
        row is a ValueError naming what to change."""
        size = self.path.stat().st_size
        start, stop = size * index // self.lanes, size * (index + 1) // self.lanes
        for epoch in itertools.count():
            chunks = _chunks(records(self.path, start, stop))
            rows = (  # copies: a row kept in the buffer does not keep its chunk's arrays
                {k: v[i].copy() for k, v in block.items()}
                for block in self.encode(chunks) for i in range(len(block["input_ids"])))
            count = 0
            for row in shuffled(rows, self.shuffle, np.random.default_rng([self.seed, epoch,
                                                                             index])):
                count += 1
                yield row
            if not count:
                raise ValueError(
                    f"--stream: bytes {start} to {stop} of --data {self.path} (row {index} of "
                    f"each batch of {self.lanes}) hold less than one --seq-len row: give more "
                    "data, a smaller --batch-size or --seq-len, or drop --stream")


def _chunks(items: Iterator[Record]) -> Iterator[list[Record]]:
    while chunk := list(itertools.islice(items, CHUNK)):
        yield chunk
