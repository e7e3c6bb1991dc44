"""`lora-jax finetune`: data, method, training (checkpoints, Ctrl-C, `--resume`), evaluation,
and the run folder (adapter/, metrics.json, metrics.jsonl, loss.png; best_adapter/ with
`--eval-every`). `prepare` and `encode_split` also serve the sweep and experiments/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_jax.cli.adapter import save_adapter
from lora_jax.cli.files import (
    check_writable,
    empty_or_absent,
    new_folder,
    unstarted_run,
    write_bytes,
    write_json,
)
from lora_jax.cli.method import DEFAULT_LR, method_options, setup_method
from lora_jax.cli.model import Loaded, check_seq_len, eos_id, load_model, model_task
from lora_jax.core.jsonfile import read_json
from lora_jax.train.metrics import MetricsLog, check_tensorboard, read_rows

EXIT_DIVERGED, EXIT_INTERRUPTED = 3, 130


# How this launch runs, not what it trains: never saved, free to change on --resume.
LAUNCH = ("mesh", "coordinator", "num_processes", "process_id")
NOT_SAVED = ("command", "resume", "out", "no_progress", "given", *LAUNCH)


def encode_split(loaded: Loaded, task: str, texts: Sequence[str], labels: Any,
                 seq_len: int, allow_empty: bool = False) -> dict[str, Any]:
    """Model inputs of one split: padded examples (classify), token blocks (lm) or input /
    target pairs (seq2seq; `labels` are then the target texts)."""
    import numpy as np

    from lora_jax.train import data

    if task == "seq2seq":
        start = getattr(loaded.module.config, "decoder_start_token_id", 0)
        return data.seq2seq_arrays(loaded.tokenizer, texts, labels, seq_len,
                                   eos_id(loaded.tokenizer), start)
    if task == "classify":
        ids, mask = data.encode(loaded.tokenizer, texts, seq_len)
        return {"input_ids": ids, "attention_mask": mask, "labels": np.asarray(labels, np.int32)}
    blocks = data.lm_blocks(loaded.tokenizer, texts, seq_len, eos_id=eos_id(loaded.tokenizer),
                            allow_empty=allow_empty)
    return {"input_ids": blocks, "attention_mask": np.ones_like(blocks)}


def encode_instructions(loaded: Loaded, part: Any, seq_len: int, packing: bool,
                        note: bool = True) -> dict[str, Any]:
    """Model inputs of one split of instruction data (`lora_jax.train.sft`): one example per
    row, or packed into rows with segment ids; `note` prints how many examples were cut."""
    from lora_jax.train import data, sft

    template, tokenizer = loaded.chat_template, loaded.tokenizer
    eos = eos_id(tokenizer)  # the model's own EOS where its chat template names one
    if template is not None and tokenizer.token_to_id(template.eos_token) is not None:
        eos = tokenizer.token_to_id(template.eos_token)
    examples = sft.tokenize(tokenizer, part, eos, template)
    cut = sum(len(ids) > seq_len for ids, _ in examples)
    if cut and note:
        print(f"note: {cut} of {len(examples)} examples are longer than --seq-len {seq_len}: "
              "their tails are cut off")
    return (sft.pack if packing else sft.rows)(examples, seq_len, data.pad_id(tokenizer))


def check_packing(args: argparse.Namespace, instructions: bool) -> None:
    """--packing needs instruction data and a forward that takes segment ids."""
    if not getattr(args, "packing", False):
        return
    if not instructions:
        raise ValueError(f"--packing packs instruction data (a .jsonl of prompt/completion or "
                         f"messages lines); --data {args.data} is not: drop --packing")
    if args.method == "prompt" or getattr(args, "frontend", "linen") == "nnx":
        raise ValueError("--packing runs on the linen models with --method lora, full or head "
                         "(the soft prompt and the NNX models take no segment ids): drop "
                         "--packing")


def prepare(args: argparse.Namespace) -> tuple[Loaded, str, tuple[Any, ...], int]:
    """(model, task, encoded train / validation / test splits, steps) of the finetune flags;
    with `--stream` the training split is a `lora_jax.train.stream.Stream` and the others are
    empty."""
    task = model_task(args.model, args.task)
    loaded, task, splits, steps = (_streamed if getattr(args, "stream", False) else _in_memory)(
        args, task)
    if args.warmup_steps is not None and args.warmup_steps >= steps:
        raise ValueError(f"--warmup-steps {args.warmup_steps} leaves none of the run's {steps} "
                         "steps after the warmup: give fewer warmup steps or more steps")
    return loaded, task, splits, steps


def _load(args: argparse.Namespace, task: str, classes: int | None) -> tuple[Loaded, str]:
    loaded, task = load_model(args.model, task, classes, args.seed, quantize=args.quantize,
                              dtype=args.dtype, param_dtype=args.param_dtype)
    check_seq_len(loaded, task, args.seq_len,
                  args.prompt_tokens if args.method == "prompt" else 0)
    return loaded, task


def _streamed(args: argparse.Namespace, task: str
              ) -> tuple[Loaded, str, tuple[Any, ...], int]:
    """`prepare` of a `--stream` run: the file read as training goes (`lora_jax.train.stream`),
    lanes of --batch-size x --grad-accum rows; no validation or test split."""
    import numpy as np

    from lora_jax.train import sft, stream

    path = Path(args.data)
    if task != "lm":
        raise ValueError(f"--stream streams --task lm data (text, or jsonl of text, prompt / "
                         f"completion or messages lines); --task {task} data is read in memory: "
                         "drop --stream")
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--stream reads a .txt or .jsonl file; --data {args.data} is not one")
    if not path.is_file():
        raise ValueError(f"--data {args.data!r}: no such file")
    if args.steps is None:
        raise ValueError("--stream needs --steps: a streamed file's number of rows is not known "
                         "before it is read (--epochs cannot be counted)")
    for flag, given in (("--limit", args.limit), ("--eval-every", args.eval_every)):
        if given:
            raise ValueError(f"{flag} needs the in-memory splits; --stream trains on the whole "
                             f"file and holds none out: drop {flag}")
    kind = sft.instruction_format(path) if path.suffix == ".jsonl" else None
    check_packing(args, kind is not None)
    loaded, task = _load(args, task, None)
    if kind is None:
        encode = stream.text_blocks(loaded.tokenizer, args.seq_len, eos_id(loaded.tokenizer),
                                    jsonl=path.suffix == ".jsonl")
    else:
        def encode(chunks: Any) -> Any:
            for chunk in chunks:
                yield encode_instructions(loaded, sft.instructions(kind, chunk), args.seq_len,
                                          getattr(args, "packing", False), note=False)
    lanes = args.batch_size * args.grad_accum
    empty = {"input_ids": np.zeros((0, args.seq_len), np.int32),
             "attention_mask": np.zeros((0, args.seq_len), np.int32)}
    return loaded, task, (stream.Stream(path, lanes, args.seed, encode), empty, empty), args.steps


def _in_memory(args: argparse.Namespace, task: str
               ) -> tuple[Loaded, str, tuple[Any, ...], int]:
    """`prepare` of data read whole: the file, split, encoded."""
    from lora_jax.train import data

    dataset = data.load_dataset(args.data, task)
    instructions = task == "lm" and (dataset.targets is not None or dataset.messages is not None)
    check_packing(args, instructions)
    loaded, task = _load(args, task, len(dataset.classes) or None)
    parts: tuple[data.TextDataset, ...] = data.split(dataset, seed=args.seed)
    if args.limit:
        parts = tuple(data.sample(p, args.limit, args.seed) for p in parts)
    if len(parts[0]) == 0:
        raise ValueError(f"--data {args.data}: the training split is empty ({len(dataset)} "
                         "examples in all): give more data")
    splits = tuple(encode_instructions(loaded, p, args.seq_len, getattr(args, "packing", False))
                   if instructions else
                   encode_split(loaded, task, p.texts,
                                p.targets if task == "seq2seq" else p.labels,
                                args.seq_len, allow_empty=i > 0)
                   for i, p in enumerate(parts))
    n_train = len(splits[0]["input_ids"])
    per_step = args.batch_size * args.grad_accum
    steps = args.steps or max(1, int((args.epochs or 2.0) * (n_train // per_step)))
    if args.eval_every and len(splits[1]["input_ids"]) == 0:
        raise ValueError(f"--eval-every {args.eval_every}: the validation split of --data "
                         f"{args.data} is empty: give more data or drop --eval-every")
    return loaded, task, splits, steps


def finetune(args: argparse.Namespace) -> int:
    """`lora-jax finetune`: train, evaluate, and write the adapter, checkpoint and metrics.

    `args` holds the finetune flags as attributes (a resumed run's saved ones, with `resume`
    set: `lora_jax.cli.main`). Returns 0, `EXIT_DIVERGED` or `EXIT_INTERRUPTED`. Every process
    of a multi-process run runs this; process 0 alone prints and writes the files.
    """
    import jax

    from lora_jax.cli.devices import start_processes

    start_processes(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                    getattr(args, "process_id", None))
    if not args.out and jax.process_count() > 1:
        raise ValueError("a multi-process run needs --out: the same folder (on a disk all hosts "
                         "share) on every host")
    out = Path(args.out or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if not args.resume and not empty_or_absent(out):
        if not unstarted_run(out):
            raise ValueError(f"--out {out} exists and is not empty: pick another folder, or "
                             f"continue an interrupted run with --resume {out}")
        print(f"reusing {out}: the run there stopped before its first checkpoint")
    check_writable(out)
    if args.tensorboard:
        check_tensorboard()
    if jax.process_count() > 1:  # every process has checked --out before any writes to it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lora-jax finetune: --out checked")
    quiet = contextlib.redirect_stdout(io.StringIO()) if jax.process_index() else None
    try:
        with quiet or contextlib.nullcontext():
            return _run(args, out)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise  # a missing input: the user's to fix, reported as such
    except OSError as err:  # a full disk: the checkpoints committed so far are kept
        where = f" ({err.filename})" if err.filename else ""
        raise OSError(f"{err.strerror or err}{where}; what {out} holds is kept: make room (or "
                      f"copy the folder to a disk with room) and continue with lora-jax "
                      f"finetune --resume {out}") from err


def _run(args: argparse.Namespace, out: Path) -> int:
    """The finetune run in `out` (checked writable), as `finetune` describes it."""
    start = time.perf_counter()

    import jax
    from jax.experimental import multihost_utils

    import lora_jax
    from lora_jax.cli.devices import Placement, mesh_text
    from lora_jax.core.checkpoint import AdapterCheckpointer
    from lora_jax.train import loop as train

    main_process = jax.process_index() == 0
    placement = Placement.of(getattr(args, "mesh", None), args.batch_size)
    loaded, task, (train_a, val_a, test_a), steps = prepare(args)
    nnx_frontend = getattr(args, "frontend", "linen") == "nnx"
    if nnx_frontend:  # a refused flag is reported before any setup or data check
        from lora_jax.cli import nnx_run

        nnx_run.check(loaded.model_type, task, args.method, args.quantize)
    streamed = getattr(args, "stream", False)
    n_train = None if streamed else len(train_a["input_ids"])
    lr = args.lr or DEFAULT_LR[args.method]
    setup = setup_method(loaded, task, args.method, **adapter_options(args), lr=lr, steps=steps,
                         prompt_tokens=args.prompt_tokens, dora=args.dora,
                         loraplus_ratio=args.loraplus_ratio, quantize=args.quantize,
                         options=method_options(args.method, vars(args)),
                         schedule=args.schedule, warmup_steps=args.warmup_steps,
                         weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm)
    if n_train is not None and args.batch_size * args.grad_accum > n_train:
        accum = f" x --grad-accum {args.grad_accum}" if args.grad_accum > 1 else ""
        raise ValueError(f"--batch-size {args.batch_size}{accum} is larger than the {n_train} "
                         f"training {'blocks' if task == 'lm' else 'examples'}: use a smaller "
                         "batch or more data")
    if nnx_frontend:  # the same setup, the NNX model's forward
        setup = nnx_run.on_nnx(setup, loaded)
    # The base and factors on the mesh (fsdp shards them), the optimizer state beside them.
    shardings = placement.shardings(setup.params,
                                    getattr(loaded.family.module, "SHARDING_RULES", None),
                                    loaded.model_type)
    params = placement.place(setup.params, shardings)
    trainable, frozen = lora_jax.split(params, setup.config)
    # Factors and optimizer state in float32 whatever --param-dtype the frozen base has.
    trainable = jax.tree.map(lambda x: x.astype(jax.numpy.float32)
                             if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x,
                             trainable)
    trainable_shardings = lora_jax.split(shardings, setup.config)[0]
    opt_state = placement.opt_state(setup.tx, trainable, trainable_shardings)
    step_fn = placement.step(train.train_step(setup.forward, task, setup.tx, args.grad_accum),
                             trainable_shardings, jax.tree.map(lambda x: x.sharding, opt_state))
    with AdapterCheckpointer(out / "checkpoint", max_to_keep=2) as checkpointer:
        start_step = 0
        losses: list[float] = []
        resumed = args.resume and checkpointer.all_steps()
        if resumed:  # onto this run's mesh, whatever the mesh the checkpoint was written from
            (start_step, trainable, opt_state, _), losses = _resume(
                checkpointer, (trainable, opt_state), setup.config, out, steps)
        if main_process:
            write_json(out / "run_config.json", run_config(args, out))
        n_trainable, n_total = lora_jax.count_parameters(setup.params, setup.config)
        print(f"trainable params: {n_trainable:,d} || all params: {n_total:,d} || "
              f"trainable%: {100 * n_trainable / n_total:.4f}")
        sizes = (f"{n_train} train / {len(val_a['input_ids'])} val / "
                 f"{len(test_a['input_ids'])} test {'blocks' if task == 'lm' else 'examples'}"
                 if n_train is not None else "streamed (no validation or test split)")
        print(f"{args.method} on {args.model} ({loaded.model_type}, {task}), data "
              f"{args.data}: {sizes}, {steps} steps of {args.batch_size} x {args.seq_len}"
              + (f" x {args.grad_accum} accumulated" if args.grad_accum > 1 else "")
              + f" on mesh {mesh_text(placement.sizes)} ({jax.process_count()} process"
              f"{'es' if jax.process_count() > 1 else ''})")
        if args.resume:
            print(f"resuming from step {start_step} of {steps}" if resumed else
                  f"{out} has no checkpoint yet: starting from step 0 of {steps}")

        def write_losses(step: int, so_far: list[float]) -> None:
            if main_process:
                write_json(out / "losses.json", so_far, indent=None)

        eval_batch = placement.eval_batch(64)  # one compiled evaluation before and after

        def evaluate(p: Any, split: Any) -> dict[str, Any]:
            return train.evaluate(setup.forward, task, p, split, eval_batch, placement.feed)

        before = evaluate(params, test_a) if task != "classify" and not start_step else None

        def write_adapter(folder: Path, trained: Any) -> None:
            """The adapter of `trained` (every process gathers it; process 0 writes it)."""
            trained = multihost_utils.process_allgather(trained, tiled=True)
            if main_process:
                with new_folder(folder) as tmp:
                    save_adapter(tmp, lora_jax.combine(trained, frozen), setup, loaded, task,
                                 args.method, args.prompt_tokens)

        result: train.FitResult | train.Interrupted | train.Diverged
        best = Best(out, start_step, lambda t: evaluate(lora_jax.combine(t, frozen), val_a),
                    lambda t: write_adapter(out / "best_adapter", t))
        log = MetricsLog(out / "metrics.jsonl", out / "tensorboard" if args.tensorboard else None,
                         start_step)
        rows = args.batch_size * args.grad_accum  # each step's global batch
        batches = (map(placement.shard, train_a.batches(placement.rows(rows), start_step))
                   if streamed else
                   train.batches(train_a, rows, args.seed, start_step, placement.feed))
        try:
            result = train.fit(setup.forward, task, setup.tx, trainable, frozen, batches,
                               steps=steps, seed=args.seed,
                               config=setup.config, opt_state=opt_state, start_step=start_step,
                               losses=losses, checkpointer=checkpointer,
                               save_every=args.save_every, on_save=write_losses,
                               progress=not args.no_progress and main_process,
                               step_fn=step_fn, grad_accum=args.grad_accum,
                               schedule=setup.schedule, log=log, eval_every=args.eval_every,
                               on_eval=best)
        except (train.Interrupted, train.Diverged) as stop:
            result = stop  # reported once the checkpointer has written its last save
        finally:
            log.close()
    if isinstance(result, train.Interrupted):
        print(f"interrupted after step {result.step}: checkpoint saved in "
              f"{out / 'checkpoint'}; continue with: lora-jax finetune --resume {out}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(result, train.Diverged):
        return _diverged(result, out, args, lr) if main_process else EXIT_DIVERGED
    params = lora_jax.combine(result.trainable, frozen)
    val, test = evaluate(params, val_a), evaluate(params, test_a)
    _print_eval(task, val, test, before)
    write_adapter(out / "adapter", result.trainable)
    if not main_process:
        return 0
    metrics = {
        "status": "finished",
        "model": loaded.source, "model_type": loaded.model_type, "task": task,
        "method": args.method, "data": args.data, "steps": steps, "lr": lr,
        "trainable_params": n_trainable, "all_params": n_total,
        "trainable_percent": 100 * n_trainable / n_total,
        "train_seconds_this_process": result.seconds,
        "step_seconds": result.step_seconds, "tokens_per_second": result.tokens_per_second,
        "validation": val, "test": test, "losses": result.losses,
        "wall_seconds_this_process": time.perf_counter() - start,
        "device": str(jax.devices()[0].platform),
        "mesh": mesh_text(placement.sizes), "processes": jax.process_count(),
    }
    if before is not None:
        metrics["test_before"] = before
    if best.step is not None:
        metrics["best"] = {"step": best.step, "validation_loss": best.loss,
                           "adapter": "best_adapter"}
        print(f"best validation loss {best.loss:.4f} at step {best.step}: adapter in "
              f"{out / 'best_adapter'}")
    write_json(out / "metrics.json", metrics)
    plot_losses(result.losses, out / "loss.png", f"{args.method} on {args.model}, {args.data}")
    print(f"wrote {out}/: adapter/, checkpoint/, metrics.json, metrics.jsonl, loss.png "
          f"({metrics['wall_seconds_this_process']:.0f} s)")
    return 0


class Best:
    """`--eval-every`'s evaluation: `best(step, trainable)` returns the validation metrics and
    calls `save(trainable)` when the loss is the lowest so far (a resumed run's best so far is
    read from metrics.jsonl, up to its checkpoint)."""

    def __init__(self, out: Path, start_step: int, evaluate: Any, save: Any) -> None:
        self.evaluate, self.save = evaluate, save
        logged = [(row["validation_loss"], row["step"]) for row in read_rows(out / "metrics.jsonl")
                  if row["step"] <= start_step and "validation_loss" in row]
        self.loss: float = math.inf
        self.step: int | None = None
        if logged:
            self.loss, self.step = min(logged)

    def __call__(self, step: int, trainable: Any) -> dict[str, Any]:
        result = self.evaluate(trainable)
        loss = result["loss"]
        assert loss is not None  # prepare refuses --eval-every on an empty validation split
        if loss < self.loss:
            self.loss, self.step = loss, step
            self.save(trainable)
        return {f"validation_{k}": v for k, v in result.items()
                if k in ("loss", "accuracy", "perplexity")}


def _resume(checkpointer: Any, target: tuple[Any, Any], config: Any, out: Path, steps: int
            ) -> tuple[Any, list[float]]:
    """(the newest intact checkpoint of the run in `out`, its losses); run_config.json's
    settings edited since the checkpoints are an error naming it, not a damaged step."""
    from lora_jax.core.checkpoint import CheckpointMismatch, CorruptCheckpoint

    settings = out / "run_config.json"
    hint = "was it edited? Put its settings back, or start a new run with another --out"
    try:
        saved = checkpointer.config().to_dict()
    except CorruptCheckpoint:  # a damaged newest step: restore_intact falls back past it
        saved = config.to_dict()
    changed = [f"{k}={v!r} (the checkpoints: {saved.get(k)!r})"
               for k, v in config.to_dict().items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"--resume {out}: {settings} gives another LoRA config than the "
                         f"checkpoints were saved with: {', '.join(changed)}; {hint}")
    try:
        restored, skipped = checkpointer.restore_intact(target=target)
    except CheckpointMismatch as err:
        raise ValueError(f"--resume {out}: {settings} does not fit the checkpoints ({err}); "
                         f"{hint}") from None
    for bad, reason in skipped:
        print(f"lora-jax: warning: skipped checkpoint step {bad} ({reason}); moved to "
              f"{out / 'checkpoint.unreadable'}", file=sys.stderr)
    if restored.step > steps:
        raise ValueError(f"--resume {out}: the checkpoint is at step {restored.step}, past "
                         f"--steps {steps}: give --steps {restored.step} or more")
    return restored, _saved_losses(checkpointer, restored.step, out)


def _diverged(bad: Any, out: Path, args: argparse.Namespace, lr: float) -> int:
    """Report a diverged run: losses.json as of the checkpoint kept, metrics.json, a hint."""
    kept = bad.last_saved
    write_json(out / "losses.json", bad.losses[:kept or 0], indent=None)
    write_json(out / "metrics.json", {
        "status": "diverged", "diverged_at_step": bad.step,
        "loss": None if bad.loss is None else str(bad.loss), "lr": lr,
        "last_finite_checkpoint": kept, "losses": bad.losses})
    where = (f"the last finite checkpoint (step {kept}) is kept in {out / 'checkpoint'}"
             if kept else "no checkpoint was saved")
    print(f"lora-jax: error: {bad}: stopped; {where}. Lower the learning rate (now --lr {lr:g}) "
          "and start a new run with another --out", file=sys.stderr)
    return EXIT_DIVERGED


def _saved_losses(checkpointer: Any, step: int, out: Path) -> list[float]:
    """The losses up to `step`: the checkpoint's own, else (older checkpoints) losses.json's."""
    extra = checkpointer.extra(step)
    if isinstance(extra, dict) and isinstance(extra.get("losses"), list):
        losses = extra["losses"]
    else:
        losses = read_json(out / "losses.json") if (out / "losses.json").exists() else []
    if not isinstance(losses, list) or len(losses) < step:
        raise ValueError(f"--resume {out}: the loss log holds {len(losses)} steps, fewer than "
                         f"the checkpoint's {step}")
    return [float(x) for x in losses[:step]]


def run_config(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in NOT_SAVED} | {"out": str(out)}


def adapter_options(args: argparse.Namespace) -> dict[str, Any]:
    """`setup_method`'s adapter keywords of the flags (shared by a run and a sweep's points)."""
    return {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, "seed": args.seed,
            "targets": args.target_regex or split_targets(args.targets),
            "init": True if args.init == "default" else args.init}


def split_targets(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ValueError("--targets is empty: give comma-separated module names, e.g. query,value")
    return names


def _print_eval(task: str, val: Mapping[str, Any], test: Mapping[str, Any],
                before: Mapping[str, Any] | None) -> None:
    key = "accuracy" if task == "classify" else "perplexity"

    def shown(name: str, result: Mapping[str, Any]) -> str:
        if result[key] is None:  # an empty split has no result, not a 0 or NaN one
            return f"{name}: no {'examples' if task == 'classify' else 'tokens'} (empty split)"
        if task == "classify":
            return (f"{name} accuracy {result['accuracy']:.4f} (loss {result['loss']:.4f}) on "
                    f"{result['examples']} examples")
        return f"{name} perplexity {result['perplexity']:.2f}"

    was = ""
    if before is not None and before.get("perplexity") is not None:
        was = f" (before: {before['perplexity']:.2f})"
    print(f"{shown('validation', val)}; {shown('test', test)}{was}")


def plot_losses(losses: Sequence[float], path: Path, title: str) -> None:
    """Training loss per step (and a moving average) as a PNG, written whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.8, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, image.getvalue())
