"""`lora-jax` under faults, NaNs and bad input: each case runs the real command in a subprocess on
tiny models and checks the exit status, the message, and that no file was lost or replaced."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from cli_run import ENV, error_line, lora_jax_cli, snapshot, strict_json


def _topics(path, per_class):
    rng = np.random.default_rng(0)
    words = {"sport": "match goal team player score coach league cup".split(),
             "money": "bank profit shares market price growth economy tax".split()}
    rows = [{"text": " ".join(rng.choice(words[label], 6)), "label": label}
            for _ in range(per_class) for label in words]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    return _topics(tmp_path_factory.mktemp("data") / "topics.jsonl", 40)


def finetune_args(model, data, out, *extra):
    return ["finetune", "--model", model, "--data", data, "--out", out, "--seq-len", "12",
            "--batch-size", "8", "--lr", "5e-2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def bert_run(tiny_bert, topics, tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 4 and 6 (kept: the newest two)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    code, _, err = lora_jax_cli(*finetune_args(tiny_bert, topics, out, "--steps", "6",
                                               "--save-every", "2"))
    assert code == 0, err
    return out


# --- data loss --------------------------------------------------------------------------------

def test_merge_never_writes_over_an_existing_folder(bert_run, tiny_bert, tmp_path):
    adapter = bert_run / "adapter"
    kept = {folder: snapshot(folder) for folder in (adapter, tiny_bert)}
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for out in (tiny_bert, adapter, other):
        code, _, err = lora_jax_cli("merge", "--adapter", adapter, "--model", tiny_bert,
                                    "--out", out)
        assert code == 2
        assert f"--out {out} exists and is not empty" in error_line(err)
    assert {folder: snapshot(folder) for folder in (adapter, tiny_bert)} == kept
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1

    merged = tmp_path / "merged"
    code, _, err = lora_jax_cli("merge", "--adapter", adapter, "--out", merged)
    assert code == 0, err
    assert sorted(p.name for p in merged.iterdir()) == ["config.json", "model.safetensors",
                                                        "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "other"]  # no temp left
    code, _, err = lora_jax_cli("merge", "--adapter", adapter, "--out", merged)  # again: refused
    assert code == 2 and "exists and is not empty" in error_line(err)


def test_a_killed_merge_leaves_a_temporary_folder_that_the_next_merge_removes(bert_run,
                                                                              tmp_path):
    """Before: each killed merge left its hidden `.merged.*.tmp` folder (up to the merged
    model's size) and nothing removed it."""
    out = tmp_path / "merged"
    proc = _start(["merge", "--adapter", bert_run / "adapter", "--out", out])
    assert _wait_for(proc, lambda: any(p.suffix == ".tmp" for p in tmp_path.iterdir()))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".merged.") and not out.exists(), left
    code, _, err = lora_jax_cli("merge", "--adapter", bert_run / "adapter", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_new_folder_removes_only_the_temporary_folders_of_dead_processes(tmp_path):
    from lora_jax.cli.files import new_folder

    final = tmp_path / "adapter"
    dead = tmp_path / ".adapter.0a1b2c3d.tmp"  # a killed process's: no lock held on it
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"partial")
    with new_folder(final) as live:  # holds its lock while being filled
        (live / "a.txt").write_text("first")
        with new_folder(final) as second:
            (second / "a.txt").write_text("second")
        assert live.is_dir() and not dead.exists()
    assert (final / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(bert_run, tmp_path, umask):
    """Files and folders a command writes get the modes the umask gives, as `open` and `mkdir`
    would (before: 0600 / 0700 whatever the umask, from mkstemp / mkdtemp and safetensors)."""
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "lora_jax", "merge", "--adapter",
                           str(bert_run / "adapter"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=ENV, umask=umask)
    assert proc.returncode == 0, proc.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
    assert modes == {"merged": 0o777 & ~umask, "config.json": 0o666 & ~umask,
                     "model.safetensors": 0o666 & ~umask, "tokenizer.json": 0o666 & ~umask}
    # The finetune run (written under this process's umask): its JSON files and adapter too.
    mask = os.umask(0)
    os.umask(mask)
    written = [bert_run / n for n in ("run_config.json", "losses.json", "metrics.json",
                                      "adapter")] + sorted((bert_run / "adapter").iterdir())
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {
        p.name: (0o777 if p.is_dir() else 0o666) & ~mask for p in written}


def test_unwritable_out_is_refused_before_the_model_loads(tmp_path, topics):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # The model does not even exist: the --out error comes first, before any loading.
    code, _, err = lora_jax_cli(*finetune_args("no-such-model", topics, blocker / "run"))
    assert code == 2 and f"--out {blocker / 'run'}: cannot write there" in error_line(err)
    code, _, err = lora_jax_cli("merge", "--adapter", tmp_path / "none", "--out",
                                blocker / "merged")
    assert code == 2 and f"--out {blocker}: cannot write there" in error_line(err)
    assert blocker.read_text() == "x"


def test_diverging_run_stops_keeps_its_last_finite_checkpoint_and_writes_valid_json(
        tiny_bert, topics, tmp_path):
    import orbax.checkpoint as ocp

    out = tmp_path / "run"
    code, _, err = lora_jax_cli(*finetune_args(tiny_bert, topics, out, "--steps", "30",
                                               "--save-every", "1", "--lr", "1e30"))
    assert code == 3, err
    line = error_line(err)
    assert "training diverged: the loss of step" in line and "Lower the learning rate" in line
    metrics = strict_json(out / "metrics.json")
    assert metrics["status"] == "diverged"
    kept = metrics["last_finite_checkpoint"]
    assert kept is not None and kept < metrics["diverged_at_step"] <= 30
    assert f"the last finite checkpoint (step {kept}) is kept" in line
    losses = strict_json(out / "losses.json")
    assert len(losses) == kept and all(np.isfinite(losses))  # matches the checkpoint kept
    steps = sorted(int(p.name) for p in (out / "checkpoint").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == kept  # rotation kept it: nothing after it was saved
    for step in steps:
        arrays = ocp.StandardCheckpointer().restore(out / "checkpoint" / str(step) / "trainable")
        import jax

        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(arrays))
    assert not (out / "adapter").exists()  # no NaN adapter


# --- silently wrong -------------------------------------------------------------------------

def test_seq_len_must_fit_the_model(tiny_bert, tiny_llama, topics, tmp_path):
    code, _, err = lora_jax_cli(*finetune_args(tiny_bert, topics, tmp_path / "a", "--seq-len",
                                               "100"))
    assert code == 2
    assert "--seq-len 100 is longer than the model's 64 positions: use at most 64" in \
        error_line(err)
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(["the match ended with a late goal"] * 20))
    code, _, err = lora_jax_cli("finetune", "--model", tiny_llama, "--data", text, "--out",
                                tmp_path / "b", "--seq-len", "1")
    assert code == 2 and "--seq-len 1 leaves no next token to predict" in error_line(err)
    # An encoder's example needs a token beside [CLS] and [SEP] (was: numpy's "cannot reshape
    # array of size 448 into shape (56,1)").
    code, _, err = lora_jax_cli(*finetune_args(tiny_bert, topics, tmp_path / "c", "--seq-len",
                                               "2"))
    assert code == 2 and ("--seq-len 2 leaves no room for text: the tokenizer adds 2 special "
                          "tokens to each example; use --seq-len 3 or more") in error_line(err)
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir())
                   for name in ("a", "b", "c"))  # nothing trained, nothing written


def test_an_empty_validation_split_is_not_reported_as_a_result(tiny_bert, tmp_path):
    data = _topics(tmp_path / "small.jsonl", 4)  # 4 per class: 3 train, 0 val, 1 test each
    out = tmp_path / "run"
    code, stdout, err = lora_jax_cli("finetune", "--model", tiny_bert, "--data", data, "--out",
                                     out, "--steps", "2", "--batch-size", "2", "--seq-len", "12",
                                     "--no-progress")
    assert code == 0, err
    assert "validation: no examples (empty split)" in stdout and "test accuracy" in stdout
    metrics = strict_json(out / "metrics.json")
    assert metrics["validation"] == {"loss": None, "accuracy": None, "examples": 0}
    assert metrics["test"]["examples"] == 2


def test_resume_refuses_flags_that_change_the_run_and_says_what_changed(bert_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bert_run, run)
    before = snapshot(run)
    code, _, err = lora_jax_cli("finetune", "--resume", run, "--lr", "1", "--r", "8")
    assert code == 2
    assert ("--lr 1.0 (saved: 0.05) would change the run; only --steps, --epochs, "
            "--save-every, --eval-every, --tensorboard, --mesh and the multi-host flags may "
            "differ") in error_line(err)
    code, _, err = lora_jax_cli("finetune", "--resume", run, "--out", tmp_path / "elsewhere")
    assert code == 2 and "writes to its own folder" in error_line(err)
    assert snapshot(run) == before

    code, stdout, err = lora_jax_cli("finetune", "--resume", run, "--steps", "8")
    assert code == 0, err
    assert "resume: --steps 8 (was 6)" in stdout and "resuming from step 6 of 8" in stdout
    assert len(strict_json(run / "metrics.json")["losses"]) == 8
    assert strict_json(run / "run_config.json")["steps"] == 8
    code, _, err = lora_jax_cli("finetune", "--resume", run, "--steps", "5")
    assert code == 2 and "the checkpoint is at step 8, past --steps 5" in error_line(err)


def _bad_adapters(adapter, tmp_path):
    """Broken copies of a good adapter folder: (name, folder, expected message)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    name = sorted(k for k in tensors if "lora_A" in k)[0]
    cases = []

    def variant(label, tensors=None, config=None, raw=None):
        folder = tmp_path / label
        shutil.copytree(adapter, folder)
        if tensors is not None:
            save_file(tensors, str(folder / "adapter_model.safetensors"))
        if config is not None:
            (folder / "adapter_config.json").write_text(config)
        if raw is not None:
            (folder / "adapter_model.safetensors").write_bytes(raw)
        return folder

    nan = dict(tensors, **{name: np.full_like(tensors[name], np.nan)})
    cases.append((variant("nan", tensors=nan), f"tensor {name} holds NaN or infinite values"))
    ints = dict(tensors, **{name: tensors[name].astype(np.int8)})
    cases.append((variant("int8", tensors=ints), f"tensor {name} is int8, not a float"))
    fields = json.loads((adapter / "adapter_config.json").read_text())
    cases.append((variant("alpha", config=json.dumps(dict(fields, lora_alpha=float("nan")))),
                  "lora_alpha must be a positive finite number, got nan"))
    cases.append((variant("rslora", config=json.dumps(dict(fields, use_rslora="no"))),
                  "use_rslora must be True or False, got 'no'"))
    cases.append((variant("json", config="{not json"), "adapter_config.json is not valid JSON"))
    raw = (adapter / "adapter_model.safetensors").read_bytes()
    cases.append((variant("truncated", raw=raw[: len(raw) // 2]),
                  "adapter_model.safetensors (truncated or corrupt?)"))
    return cases


def test_broken_adapters_are_refused_by_merge_and_generate(bert_run, tiny_llama, tmp_path):
    for folder, message in _bad_adapters(bert_run / "adapter", tmp_path):
        before = snapshot(folder)
        code, _, err = lora_jax_cli("merge", "--adapter", folder, "--out", tmp_path / "m")
        assert code == 2, (folder.name, err)
        line = error_line(err)
        assert message in line and str(folder) in line, (folder.name, line)
        if folder.name in ("nan", "truncated"):
            code, _, err = lora_jax_cli("generate", "--model", tiny_llama, "--adapter", folder,
                                        "--prompt", "the match")
            assert code == 2 and message in error_line(err)
        assert snapshot(folder) == before and not (tmp_path / "m").exists()


def test_generate_names_the_adapter_that_does_not_fit(bert_run, tiny_llama, tmp_path):
    """One adapter per prompt, the second for another model: the error names that --adapter
    (before: `load_peft: '...bert.encoder...' names the module ..., which is not in the params
    tree`, without saying which of the folders)."""
    import jax

    import lora_jax
    from lora_jax.models import from_pretrained

    _, base = from_pretrained(tiny_llama)
    config = lora_jax.LoraConfig(r=2, target_modules=["q_proj"])
    good = tmp_path / "llama_adapter"
    lora_jax.save_peft(good, lora_jax.inject(base, config, jax.random.key(0)), config,
                       model_type="llama")
    wrong = bert_run / "adapter"
    before = {folder: snapshot(folder) for folder in (good, wrong)}
    code, out, err = lora_jax_cli("generate", "--model", tiny_llama, "--prompt", "a", "--prompt",
                                  "b", "--adapter", good, "--adapter", wrong,
                                  "--max-new-tokens", "2")
    assert code == 2 and not out
    assert error_line(err).startswith(f"lora-jax: error: --adapter {wrong}: load_peft: ")
    assert {folder: snapshot(folder) for folder in (good, wrong)} == before


def test_a_full_disk_is_one_line_exit_1_and_the_run_resumes(tiny_bert, topics, tmp_path):
    """Files may grow to 4 KB only (RLIMIT_FSIZE, as a full disk refuses the write): the first
    checkpoint cannot be written. Before: exit 2 or 1 by where it failed, 2-6 orbax tracebacks
    and the raw tensorstore message; now one line naming the checkpoint folder, exit 1, and
    the folder resumes (tensorstore may still print "Event loop is closed" from its threads)."""
    out = tmp_path / "run"
    argv = finetune_args(tiny_bert, topics, out, "--steps", "6", "--save-every", "2")
    limited = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, "
               "4096)); os.execv(sys.executable, [sys.executable, '-m', 'lora_jax', "
               "*sys.argv[1:]])")
    proc = subprocess.run([sys.executable, "-c", limited, *map(str, argv)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 1, proc.stderr
    assert (f"lora-jax: error: cannot write a checkpoint in {out / 'checkpoint'}: File too "
            f"large; what {out} holds is kept: make room (or copy the folder to a disk with "
            f"room) and continue with lora-jax finetune --resume {out}\n") in proc.stderr
    assert proc.stderr.count("lora-jax: error") == 1
    assert "absl" not in proc.stderr and "orbax" not in proc.stderr.replace(
        "orbax-checkpoint-tmp", "")
    code, stdout, err = lora_jax_cli("finetune", "--resume", out)
    assert code == 0, err
    assert len(strict_json(out / "metrics.json")["losses"]) == 6


# --- crashes and unclear errors --------------------------------------------------------------

def test_bad_data_and_config_files_name_the_file(tiny_bert, tmp_path):
    lists = tmp_path / "lists.jsonl"
    lists.write_text('{"text": "a", "label": ["x"]}\n{"text": "b", "label": ["y"]}\n')
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9", "label": "a"}\n')
    for path, message in ((lists, f'{lists}:1: "label" must be a string or an integer, got list'),
                          (latin, f"{latin}:1: not UTF-8 text")):
        code, _, err = lora_jax_cli(*finetune_args(tiny_bert, path, tmp_path / "out"))
        assert code == 2 and message in error_line(err)

    broken_model = tmp_path / "model"
    shutil.copytree(tiny_bert, broken_model)
    (broken_model / "config.json").write_text('{"model_type": "bert",')
    code, _, err = lora_jax_cli(*finetune_args(broken_model, lists, tmp_path / "out"))
    assert code == 2 and f"{broken_model / 'config.json'} is not valid JSON" in error_line(err)


def test_resume_with_a_damaged_run_config_names_the_file(bert_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bert_run, run)
    (run / "run_config.json").write_bytes(b"\xff\xfe garbage")
    code, _, err = lora_jax_cli("finetune", "--resume", run)
    assert code == 2 and f"{run / 'run_config.json'} is not UTF-8 text" in error_line(err)
    fields = strict_json(bert_run / "run_config.json")
    (run / "run_config.json").write_text(json.dumps(dict(fields, lr=float("nan"))))
    code, _, err = lora_jax_cli("finetune", "--resume", run)
    assert code == 2
    assert f"{run / 'run_config.json'}: argument --lr: must be a finite number" in error_line(err)


def test_resume_after_run_config_was_edited_names_the_file(bert_run, tmp_path):
    """Before: 22 orbax tracebacks and "no intact checkpoint ... cannot be read: Requested
    shape: (32, 4) is not compatible with the stored shape: (32, 8)", blaming the checkpoints."""
    run = tmp_path / "run"
    shutil.copytree(bert_run, run)
    fields = strict_json(run / "run_config.json")
    (run / "run_config.json").write_text(json.dumps(dict(fields, r=4)))
    before = snapshot(run)
    code, _, err = lora_jax_cli("finetune", "--resume", run)
    assert code == 2
    assert (f"--resume {run}: {run / 'run_config.json'} gives another LoRA config than the "
            "checkpoints were saved with: r=4 (the checkpoints: 8); was it edited?") in \
        error_line(err)
    assert snapshot(run) == before and not (tmp_path / "run" / "checkpoint.unreadable").exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_step(bert_run, tmp_path):
    """Step 6's metadata is garbage and losses.json lost its tail (a kill between the checkpoint
    commit and the losses write): the resume restores step 4 with its own committed losses and
    repeats the uninterrupted run's losses exactly."""
    run = tmp_path / "run"
    shutil.copytree(bert_run, run)
    want = strict_json(bert_run / "metrics.json")["losses"]
    (run / "checkpoint" / "6" / "meta" / "metadata").write_text("{broken")
    (run / "losses.json").write_text(json.dumps(want[:3]))
    code, stdout, err = lora_jax_cli("finetune", "--resume", run)
    assert code == 0, err
    assert "warning: skipped checkpoint step 6" in err and "metadata is not valid JSON" in err
    assert "resuming from step 4 of 6" in stdout
    assert strict_json(run / "metrics.json")["losses"] == want
    assert (run / "checkpoint.unreadable" / "6" / "meta" / "metadata").read_text() == "{broken"


def test_a_run_stopped_before_its_first_checkpoint_can_be_rerun_or_resumed(tiny_bert, topics,
                                                                            tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "lora_jax",
            *map(str, finetune_args(tiny_bert, topics, out, "--steps", "5000"))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=ENV)
    for line in proc.stdout:
        if line.startswith("lora on"):  # printed just before run_config.json and training
            break
    proc.send_signal(signal.SIGKILL)  # no cleanup at all
    proc.wait(timeout=60)
    assert (out / "run_config.json").exists()
    steps = [p for p in (out / "checkpoint").iterdir() if p.name.isdigit()] \
        if (out / "checkpoint").exists() else []
    assert not steps  # killed long before step 5000's (only) checkpoint
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)

    code, stdout, err = lora_jax_cli("finetune", "--resume", out, "--steps", "3")
    assert code == 0, err
    assert "has no checkpoint yet: starting from step 0 of 3" in stdout
    assert len(strict_json(out / "metrics.json")["losses"]) == 3

    code, stdout, err = lora_jax_cli(*finetune_args(tiny_bert, topics, saved, "--steps", "2"))
    assert code == 0, err
    assert "stopped before its first checkpoint" in stdout
    assert len(strict_json(saved / "metrics.json")["losses"]) == 2


def test_a_run_killed_while_writing_its_run_config_can_be_rerun(tmp_path):
    """Killed inside write_json(run_config.json): only our temporary file is left, and the
    folder counts as an unstarted run (before: "--out exists and is not empty")."""
    from lora_jax.cli.files import unstarted_run

    out = tmp_path / "run"
    out.mkdir()
    (out / ".run_config.json.x1y2.tmp").write_text('{"mod')
    assert unstarted_run(out)
    (out / "notes.txt").write_text("mine")  # anything else is the user's: never reused
    assert not unstarted_run(out)


def test_merge_of_an_adapter_saved_without_task_type(bert_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(bert_run / "adapter", adapter)
    fields = json.loads((adapter / "adapter_config.json").read_text())
    del fields["task_type"]  # e.g. saved by hand: the classifier tensors still say what it is
    (adapter / "adapter_config.json").write_text(json.dumps(fields))
    code, stdout, err = lora_jax_cli("merge", "--adapter", adapter, "--out", tmp_path / "m")
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]


# --- killed at random points ---------------------------------------------------------------------

KILL_ARGS = ("--steps", "24", "--save-every", "2")


def _kill_cases():
    """20 seeded kill points, 15 in `finetune` and 5 in `merge`, each a kind of moment:
    - start (3): a fraction of the time until the run announces training ("lora on ..."):
      imports, model loading, data;
    - compiling (2): after the announcement, a fraction of the time until checkpoint step 2;
    - saving (4): once checkpoint step k exists, as soon as the next save's temporary folder
      appears, plus up to 50 ms (inside an orbax save);
    - saved (4): up to 300 ms after checkpoint step k appears (training on, or the commit);
    - finishing (2): after the last checkpoint (step 24), a fraction of the time the run then
      takes (evaluation, the adapter, metrics.json, loss.png);
    - merge (5): a fraction of merge's wall time (loading, merging, writing, the rename).
    Times are those of one uninterrupted run. The CI tier runs one saving case (killed inside
    an orbax save, the one the atomic commit must survive); the full tier all 20."""
    rng = np.random.default_rng(0)
    kinds = (["start"] * 3 + ["compiling"] * 2 + ["saving"] * 4 + ["saved"] * 4
             + ["finishing"] * 2 + ["merge"] * 5)
    cases = []
    for kind in kinds:
        if kind in ("saving", "saved"):
            step = int(rng.integers(1, 12)) * 2  # a checkpoint step of the 24 (every 2)
            cases.append((kind, step, float(rng.uniform(0, 0.05 if kind == "saving" else 0.3))))
        else:
            cases.append((kind, None, float(rng.uniform(0, 1))))
    return [pytest.param(*case, id=f"case{i}-{case[0]}",
                         marks=() if i == 5 else pytest.mark.full)
            for i, case in enumerate(cases)]


def _start(argv):
    return subprocess.Popen([sys.executable, "-m", "lora_jax", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)


def _announced(proc):
    """Read the run's output until it announces training; False if it ended first."""
    return any(line.startswith("lora on") for line in proc.stdout)


def _wait_for(proc, ready, timeout=300):
    """Poll every 5 ms until `ready()` or the process ends; whether `ready()` came first."""
    import time

    deadline = time.perf_counter() + timeout
    while proc.poll() is None and time.perf_counter() < deadline:
        if ready():
            return True
        time.sleep(0.005)
    return False


def _saving(folder):
    """Whether a checkpoint save is under way: orbax's temporary folder of a step exists."""
    return folder.exists() and any(not p.name.isdigit() for p in folder.iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert, topics, tmp_path_factory):
    """One uninterrupted finetune and merge: their outputs and how long their phases took."""
    import time

    root = tmp_path_factory.mktemp("uninterrupted")
    checkpoints = root / "run" / "checkpoint"
    start = time.perf_counter()
    proc = _start(finetune_args(tiny_bert, topics, root / "run", *KILL_ARGS))
    assert _announced(proc)
    announced = time.perf_counter()
    assert _wait_for(proc, lambda: (checkpoints / "2").is_dir())
    first = time.perf_counter()
    assert _wait_for(proc, lambda: (checkpoints / "24").is_dir())
    last = time.perf_counter()
    assert proc.wait(timeout=300) == 0
    proc.stdout.close()
    ended = time.perf_counter()
    code, _, err = lora_jax_cli("merge", "--adapter", root / "run" / "adapter", "--out",
                                root / "merged")
    assert code == 0, err
    seconds = {"start": announced - start, "compiling": first - announced,
               "finishing": ended - last, "merge": time.perf_counter() - ended}
    print(f"uninterrupted: {seconds}")
    return {"root": root, "losses": strict_json(root / "run" / "metrics.json")["losses"],
            "merged": snapshot(root / "merged"), "seconds": seconds}


def _state(out):
    """Where a killed finetune stopped, read from what it left in `out`."""
    if (out / "metrics.json").exists():
        return "finished"
    if not (out / "run_config.json").exists():
        return "starting (no run_config.json)"
    names = [p.name for p in (out / "checkpoint").iterdir()] if (out / "checkpoint").exists() \
        else []
    steps = sorted(int(n) for n in names if n.isdigit())
    saving = any(not n.isdigit() for n in names)  # orbax's temporary folder of a step
    if (out / "adapter").exists() or any(p.name.startswith(".adapter") for p in out.iterdir()):
        return "writing the adapter / metrics"
    if not steps:
        return "training, before the first checkpoint" + (" (saving it)" if saving else "")
    return f"training after step {steps[-1]}" + (" (saving the next)" if saving else "")


def _reached(kind, step, state):
    """Whether a kill at a `kind` moment (`_kill_cases`) left the folder in that moment's state."""
    if kind == "start":  # before the first step (at the latest as run_config.json appears)
        return state in ("starting (no run_config.json)", "training, before the first checkpoint")
    if kind == "compiling":
        return state.startswith("training, before the first checkpoint")
    if kind == "finishing":  # evaluating, writing the adapter, metrics.json or loss.png
        return state in ("training after step 24", "writing the adapter / metrics", "finished")
    if kind == "merge":  # merging, or just renamed into place
        return state in ("merging", "finished")
    saved = state.startswith("training after step ") and int(state.split()[3]) >= step
    return saved and (kind == "saved" or state.endswith("(saving the next)"))


@pytest.mark.parametrize("kind, step, amount", _kill_cases())
def test_killed_at_a_seeded_random_time_the_folder_resumes_or_reruns(
        kind, step, amount, uninterrupted, tiny_bert, topics, tmp_path):
    """SIGKILL (no cleanup) at a seeded point of a finetune or merge (see `_kill_cases`), while it
    runs and in the phase the point names (asserted). A finetune folder left behind resumes (it
    has run_config.json) or reruns (it has not), and the finished run's losses equal the
    uninterrupted run's; a merge leaves no `--out` or a complete one, the adapter and base
    untouched, and a rerun writes the uninterrupted merge's files."""
    import time

    if kind == "merge":
        adapter = uninterrupted["root"] / "run" / "adapter"
        inputs = {folder: snapshot(folder) for folder in (adapter, tiny_bert)}
        out = tmp_path / "merged"
        argv = ["merge", "--adapter", adapter, "--out", out]
    else:
        out = tmp_path / "run"
        argv = finetune_args(tiny_bert, topics, out, *KILL_ARGS)
    checkpoints = out / "checkpoint"
    ends = {  # when a timed phase is over: the kill comes then at the latest
        "start": lambda: (out / "run_config.json").exists(),
        "compiling": lambda: checkpoints.exists() and any(checkpoints.iterdir()),
        "finishing": lambda: (out / "metrics.json").exists(),
        "merge": out.exists,
    }
    proc = _start(argv)
    if kind == "compiling":
        assert _announced(proc)
    elif kind == "finishing":
        assert _wait_for(proc, lambda: (checkpoints / "24").is_dir())
    elif kind in ("saving", "saved"):
        assert _wait_for(proc, lambda: (checkpoints / str(step)).is_dir())
        if kind == "saving":
            assert _wait_for(proc, lambda: _saving(checkpoints))
    if step:
        time.sleep(amount)
    else:
        _wait_for(proc, ends[kind], timeout=amount * uninterrupted["seconds"][kind])
    proc.send_signal(signal.SIGKILL)
    code = proc.wait(timeout=60)
    proc.stdout.close()
    point = (f"{kind} at {amount:.2f} x {uninterrupted['seconds'][kind]:.1f} s" if step is None
             else f"{kind} at step {step} + {1000 * amount:.0f} ms")
    assert code == -signal.SIGKILL, f"{point}: the run ended (status {code}) before the kill"

    if kind == "merge":
        assert {folder: snapshot(folder) for folder in inputs} == inputs
        state = "finished" if out.exists() else "merging"  # renamed into place whole, or not
    else:
        state = _state(out)
    assert _reached(kind, step, state), f"{point}: the kill came at '{state}'"
    if kind == "merge":
        if state == "merging":
            code, _, err = lora_jax_cli(*argv)
            assert code == 0, err
        assert snapshot(out) == uninterrupted["merged"]
    else:
        if state != "finished":
            resume = (out / "run_config.json").exists()
            code, _, err = lora_jax_cli(*(("finetune", "--resume", out) if resume else argv))
            assert code == 0, (state, err)
        assert strict_json(out / "metrics.json")["losses"] == uninterrupted["losses"], state
