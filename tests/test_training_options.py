"""`lora-jax finetune`'s precision and optimisation flags (--dtype, --param-dtype, --grad-accum,
--schedule, --warmup-steps, --weight-decay, --max-grad-norm, --eval-every) and what a run logs
(metrics.jsonl, TensorBoard scalars), each checked against optax or a run without the flag."""

import json
import sys

import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from lora_jax.cli import main as cli
from lora_jax.cli.method import unit_schedule


def run_main(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    """A small text file: about 40 LM blocks of 16 tokens with the MiniLM tokenizer."""
    rng = np.random.default_rng(0)
    words = "the match ended with a late goal for the home team after the break".split()
    path = tmp_path_factory.mktemp("notes") / "notes.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words, 12)) for _ in range(60)))
    return path


def lm_args(model, data, out, *extra):
    return ["finetune", "--model", model, "--data", data, "--out", out, "--seq-len", "16",
            "--dropout", "0", "--no-progress", *extra]


def rows(out):
    """metrics.jsonl, every line strict JSON (no NaN / Infinity)."""
    def bad(constant):
        raise AssertionError(f"metrics.jsonl holds bare {constant}")

    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=bad) for line in lines]


# --- bad values: one line naming the flag ---------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--grad-accum", "0"], "argument --grad-accum: must be positive, got 0"),
    (["--schedule", "step"], "argument --schedule: invalid choice: 'step'"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: must be non-negative, got -1"),
    (["--weight-decay", "nan"], "argument --weight-decay: must be a finite number, got nan"),
    (["--weight-decay=-0.1"], "argument --weight-decay: must be >= 0, got -0.1"),
    (["--max-grad-norm=-1"], "argument --max-grad-norm: must be >= 0, got -1"),
    (["--eval-every", "0"], "argument --eval-every: must be positive, got 0"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--param-dtype", "int8"], "argument --param-dtype: invalid choice: 'int8'"),
])
def test_bad_values_are_one_line_naming_the_flag(capsys, argv, message):
    code, _, err = run_main(capsys, "finetune", *argv)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_tensorboard_without_tensorboardx_says_how_to_install(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    code, _, err = run_main(capsys, "finetune", "--tensorboard", "--out", tmp_path / "run")
    assert code == 2
    assert "--tensorboard needs the tensorboardX package: pip install 'lora-jax[tensorboard]'" \
        in err and len(err.strip().splitlines()) == 1


def test_warmup_must_leave_steps(capsys, tiny_llama, notes, tmp_path):
    code, _, err = run_main(capsys, *lm_args(tiny_llama, notes, tmp_path / "run", "--steps", "4",
                                             "--warmup-steps", "4"))
    assert code == 2 and "--warmup-steps 4 leaves none of the run's 4 steps" in err


# --- schedules: optax's -------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, warmup", [("constant", 3), ("linear", 2), ("cosine", 0),
                                              ("cosine", None)])
def test_unit_schedule_is_optax_schedule(schedule, warmup):
    steps, peak = 20, 3e-3
    w = max(1, steps // 10) if warmup is None else warmup
    expected = {
        "constant": optax.schedules.warmup_constant_schedule(0.0, peak, w),
        "linear": optax.schedules.join_schedules(
            [optax.schedules.linear_schedule(0.0, peak, w),
             optax.schedules.linear_schedule(peak, 0.0, steps - w)], [w]),
        "cosine": optax.schedules.warmup_cosine_decay_schedule(0.0, peak, w, steps),
    }[schedule]
    unit = unit_schedule(steps, schedule, warmup)
    got = [peak * float(unit(c)) for c in range(steps + 1)]
    np.testing.assert_allclose(got, [float(expected(c)) for c in range(steps + 1)], rtol=1e-6,
                               atol=1e-12)


# --- one logged run: metrics.jsonl, the learning rate, --eval-every's best adapter ---------------

@pytest.fixture(scope="module")
def logged_run(tiny_llama, notes, tmp_path_factory):
    """8 steps of LoRA with a linear schedule, evaluated every 2 steps, with TensorBoard."""
    out = tmp_path_factory.mktemp("logged") / "run"
    argv = lm_args(tiny_llama, notes, out, "--steps", "8", "--batch-size", "4", "--lr", "3e-2",
                   "--schedule", "linear", "--warmup-steps", "2", "--eval-every", "2",
                   "--tensorboard")
    assert cli.main([str(a) for a in argv]) == 0
    return out


def test_metrics_jsonl_has_one_line_per_step(logged_run):
    logged = rows(logged_run)
    metrics = json.loads((logged_run / "metrics.json").read_text())
    assert [r["step"] for r in logged] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in logged], metrics["losses"], rtol=1e-6)
    for r in logged:
        assert r["seconds"] > 0 and r["examples_per_second"] > 0
        assert r["tokens_per_second"] == pytest.approx(4 * 16 / r["seconds"])
    events = list((logged_run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"validation_loss" in events[0].read_bytes()


def test_logged_lr_is_optax_schedule(logged_run):
    peak, warmup, steps = 3e-2, 2, 8
    expected = optax.schedules.join_schedules(
        [optax.schedules.linear_schedule(0.0, peak, warmup),
         optax.schedules.linear_schedule(peak, 0.0, steps - warmup)], [warmup])
    # Row s logs the rate of step s's update: optax's count before it is s - 1.
    np.testing.assert_allclose([r["lr"] for r in rows(logged_run)],
                               [float(expected(s - 1)) for s in range(1, steps + 1)], rtol=1e-6)


def test_eval_every_keeps_the_best_steps_adapter(logged_run, tiny_llama):
    evaluated = [r for r in rows(logged_run) if "validation_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4, 6, 8]
    best = min(evaluated, key=lambda r: r["validation_loss"])
    metrics = json.loads((logged_run / "metrics.json").read_text())
    assert metrics["best"]["step"] == best["step"]
    assert metrics["best"]["validation_loss"] == best["validation_loss"]
    # The kept adapter is that step's: evaluated on the validation split it gives its loss.
    import lora_jax
    from lora_jax.cli.finetune import prepare
    from lora_jax.cli.main import _resumed_args
    from lora_jax.peft.files import load_peft
    from lora_jax.train import loop as train

    args = _resumed_args(cli.argparse.Namespace(resume=str(logged_run), given={},
                                                no_progress=True))
    loaded, task, (_, val, _), _ = prepare(args)
    params, config = load_peft(logged_run / "best_adapter", loaded.params,
                               model_type=loaded.model_type)
    apply = lora_jax.wrap(loaded.module.apply, config)
    forward = lambda p, batch, key: apply({"params": p}, batch["input_ids"],
                                          batch["attention_mask"])
    got = train.evaluate(forward, task, params, val, 64)["loss"]
    assert got == pytest.approx(best["validation_loss"], rel=1e-5)
    others = [r["validation_loss"] for r in evaluated if r["step"] != best["step"]]
    assert all(abs(got - other) > 1e-6 * other for other in others)  # not another step's


@pytest.mark.parametrize("flag, value", [
    ("--grad-accum", "2"), ("--schedule", "cosine"), ("--warmup-steps", "1"),
    ("--weight-decay", "0.1"), ("--max-grad-norm", "0.5"), ("--dtype", "bfloat16"),
    ("--param-dtype", "bfloat16"), ("--stream", None)])
def test_resume_refuses_the_new_flags_that_change_the_run(capsys, logged_run, flag, value):
    code, _, err = run_main(capsys, "finetune", "--resume", logged_run, flag,
                            *([] if value is None else [value]))
    assert code == 2 and f"--resume {logged_run}: {flag} " in err and "would change the run" \
        in err, err


# --- --grad-accum: a K times larger batch --------------------------------------------------------

def _losses_and_adapter(out):
    losses = json.loads((out / "metrics.json").read_text())["losses"]
    return np.asarray(losses), load_file(out / "adapter" / "adapter_model.safetensors")


def test_grad_accum_4_at_batch_4_equals_batch_16(capsys, tiny_llama, notes, tmp_path):
    common = ("--steps", "3", "--lr", "3e-2")
    code, _, err = run_main(capsys, *lm_args(tiny_llama, notes, tmp_path / "accum", *common,
                                             "--batch-size", "4", "--grad-accum", "4"))
    assert code == 0, err
    code, _, err = run_main(capsys, *lm_args(tiny_llama, notes, tmp_path / "big", *common,
                                             "--batch-size", "16"))
    assert code == 0, err
    accum_losses, accum = _losses_and_adapter(tmp_path / "accum")
    big_losses, big = _losses_and_adapter(tmp_path / "big")
    np.testing.assert_allclose(accum_losses, big_losses, rtol=1e-5)
    assert accum.keys() == big.keys()
    for key in big:  # relative to each factor's norm: Adam's g / sqrt(v) magnifies the rounding
        # of near-zero gradient entries (the summation order differs), not whole factors
        error = np.linalg.norm(accum[key] - big[key]) / np.linalg.norm(big[key])
        assert error < 1e-5, (key, error)
    assert accum_losses[-1] != accum_losses[0]  # it trained


# --- --dtype bfloat16: bf16 compute and base, float32 factors and optimizer state ----------------

@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    """Two easy classes: sport words vs money words."""
    rng = np.random.default_rng(0)
    words = {"sport": "match goal team player score coach league cup".split(),
             "money": "bank profit shares market price growth economy tax".split()}
    rows = [{"text": " ".join(rng.choice(words[label], 6)), "label": label}
            for _ in range(40) for label in words]
    path = tmp_path_factory.mktemp("data") / "topics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def classify_args(model, data, out, dtype):
    return ["finetune", "--model", model, "--data", data, "--out", out, "--seq-len", "12",
            "--batch-size", "8", "--steps", "16", "--lr", "5e-2", "--schedule", "constant",
            "--warmup-steps", "0", "--no-progress", "--dtype", dtype, "--param-dtype", dtype]


def test_bf16_run_trains_with_float32_factors_and_optimizer_state(capsys, tiny_bert, topics,
                                                                 tmp_path):
    import jax.numpy as jnp

    from lora_jax.cli.model import load_model

    loaded, _ = load_model(str(tiny_bert), "classify", 2, dtype="bfloat16",
                           param_dtype="bfloat16")
    assert loaded.module.dtype == jnp.bfloat16
    assert {x.dtype for x in jax_leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}

    out = tmp_path / "bf16"
    code, _, err = run_main(capsys, *classify_args(tiny_bert, topics, out, "bfloat16"))
    assert code == 0, err
    losses = json.loads((out / "metrics.json").read_text())["losses"]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])  # two separable topics
    # The checkpoint's arrays as saved: LoRA factors, the (modules_to_save) classifier head,
    # AdamW's moments and counts.
    signature = json.loads((out / "checkpoint" / "16" / "meta" / "metadata").read_text()
                           )["digest"]["signature"]
    assert {dtype for _, dtype, _ in signature} == {"float32", "int32"}, signature
    assert any("classifier" in path and path.startswith("[0]") for path, _, _ in signature)
    assert any(".mu" in path and path.startswith("[1]") for path, _, _ in signature)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {v.dtype for v in adapter.values()} == {np.dtype(np.float32)}


@pytest.mark.full
def test_bf16_losses_follow_float32(capsys, tiny_bert, topics, tmp_path):
    runs = {}
    for dtype in ("bfloat16", "float32"):
        code, _, err = run_main(capsys, *classify_args(tiny_bert, topics, tmp_path / dtype,
                                                       dtype))
        assert code == 0, err
        runs[dtype] = json.loads((tmp_path / dtype / "metrics.json").read_text())["losses"]
    np.testing.assert_allclose(runs["bfloat16"], runs["float32"], rtol=0.05, atol=0.02)


def jax_leaves(tree):
    import jax

    return [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]


@pytest.mark.full
def test_grad_accum_equals_a_larger_batch_with_uneven_target_lengths(capsys, tiny_t5, tmp_path):
    """seq2seq targets of different lengths: each micro-batch has its own token count, so only
    the whole batch's weighted mean (not a mean of micro-batch means) equals the large batch."""
    rng = np.random.default_rng(1)
    words = "red green blue lamp desk chair table light".split()
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"input": " ".join(rng.choice(words, 6)),
                                          "target": " ".join(rng.choice(words, n))})
                              for n in rng.integers(1, 8, 80)))
    runs = {}
    for name, flags in (("accum", ("--batch-size", "2", "--grad-accum", "4")),
                        ("big", ("--batch-size", "8"))):
        code, _, err = run_main(capsys, "finetune", "--model", tiny_t5, "--task", "seq2seq",
                                "--data", data, "--out", tmp_path / name, "--seq-len", "12",
                                "--dropout", "0", "--steps", "4", "--lr", "1e-2",
                                "--no-progress", *flags)
        assert code == 0, err
        runs[name] = _losses_and_adapter(tmp_path / name)
    np.testing.assert_allclose(runs["accum"][0], runs["big"][0], rtol=1e-5)
    for key, value in runs["big"][1].items():
        error = np.linalg.norm(runs["accum"][1][key] - value) / np.linalg.norm(value)
        assert error < 1e-5, (key, error)


@pytest.mark.full
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_logged_lr_is_optax_schedule_for_each_schedule(capsys, tiny_llama, notes, tmp_path,
                                                       schedule):
    steps, peak = 10, 1e-2  # cosine: the default warmup, 10% of the steps
    out = tmp_path / schedule
    extra = ("--warmup-steps", "3") if schedule == "constant" else ()
    code, _, err = run_main(capsys, *lm_args(tiny_llama, notes, out, "--steps", steps,
                                             "--batch-size", "4", "--lr", peak, "--schedule",
                                             schedule, *extra))
    assert code == 0, err
    expected = (optax.schedules.warmup_constant_schedule(0.0, peak, 3) if schedule == "constant"
                else optax.schedules.warmup_cosine_decay_schedule(0.0, peak, 1, steps))
    np.testing.assert_allclose([r["lr"] for r in rows(out)],
                               [float(expected(s)) for s in range(steps)], rtol=1e-6)


@pytest.mark.full
def test_resume_keeps_one_metrics_line_per_step_and_the_best_adapter(capsys, logged_run,
                                                                     tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(logged_run, run)
    first = rows(run)
    # A line past the checkpoint (a run killed after logging step 9, before its checkpoint).
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({**first[-1], "step": 9, "loss": 99.0}) + "\n")
    code, out, err = run_main(capsys, "finetune", "--resume", run, "--steps", "12",
                              "--eval-every", "3")
    assert code == 0, err
    assert "resume: --eval-every 3 (was 2)" in out
    logged = rows(run)
    assert [r["step"] for r in logged] == list(range(1, 13))
    assert logged[:8] == first and logged[8]["loss"] != 99.0
    evaluated = [r for r in logged if "validation_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4, 6, 8, 9, 12]
    best = min(evaluated, key=lambda r: r["validation_loss"])
    assert json.loads((run / "metrics.json").read_text())["best"]["step"] == best["step"]
