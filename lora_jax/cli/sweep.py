"""`lora-jax finetune --sweep KEY=V1,V2 ...`: one LoRA run per point of the sweeps' cartesian
product, trained together in one compiled step on one frozen base (`lora_jax.multi.sweep`); a
run folder per point under --out (`lr=0.0001_r=8/`, as a normal run's) and summary.json / .md.
Keys: `lr`, `r`, `lora_alpha`, `seed` (docs/guides/many_adapters.md); other flags are shared.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_jax.cli.adapter import save_adapter
from lora_jax.cli.files import check_writable, new_folder, write_bytes, write_json
from lora_jax.cli.finetune import (
    EXIT_DIVERGED,
    adapter_options,
    plot_losses,
    prepare,
    run_config,
)
from lora_jax.cli.method import DEFAULT_LR, setup_method, training_tx

# --sweep key (a point key of `lora_jax.multi.sweep`: peft's field names) -> the finetune flag
# (its dest) whose values it takes, each checked as that flag's value is.
KEYS = {"lr": "lr", "r": "r", "lora_alpha": "alpha", "seed": "seed"}
RENAMED = {"alpha": "lora_alpha"}  # keys of earlier versions: refused, naming the key to use


def axis(text: str, types: Mapping[str, Callable[[str], Any]]) -> tuple[str, list[Any]]:
    """One `--sweep KEY=V1,V2,...` flag as (key, values), each value read by `types[flag]`, the
    argparse type of the flag the key stands for (so `lr=inf` is refused as `--lr inf` is).
    Used as the flag's argparse type: errors are `argparse.ArgumentTypeError`s.

    >>> axis("lora_alpha=8,16", {"alpha": float})
    ('lora_alpha', [8.0, 16.0])
    """
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: write KEY=V1,V2,... (keys: {sorted(KEYS)})")
    if key in RENAMED:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the key is {RENAMED[key]} (peft's name, as in LoraConfig): write "
            f"--sweep {RENAMED[key]}={values}")
    if key not in KEYS:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown key {key!r}; a sweep varies "
                                         f"{sorted(KEYS)} (other flags are shared by all points)")
    parsed = []
    for value in (v.strip() for v in values.split(",")):
        try:
            parsed.append(types[KEYS[key]](value))
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    if len(set(parsed)) < len(parsed):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a value")
    return key, parsed


def points(axes: Sequence[tuple[str, Sequence[Any]]]) -> list[dict[str, Any]]:
    """The points of the `--sweep` flags' (key, values): their cartesian product, in order.

    >>> points([("lr", [1e-4, 3e-4]), ("r", [8, 16])])[1]
    {'lr': 0.0001, 'r': 16}
    """
    keys = [key for key, _ in axes]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"--sweep {key} is given twice: list all its values in one flag")
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(values for _, values in axes))]


def name(point: Mapping[str, Any]) -> str:
    """The run folder of a point, e.g. `lr=0.0001_r=8`."""
    return "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in point.items())


def optimizer_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The optimizer's flags (--schedule, --warmup-steps, --weight-decay, --max-grad-norm) as
    `training_tx` keywords."""
    return {"schedule": args.schedule, "warmup_steps": args.warmup_steps,
            "weight_decay": 0.01 if args.weight_decay is None else args.weight_decay,
            "max_grad_norm": args.max_grad_norm}


def _check(args: argparse.Namespace) -> None:
    refused = [("--resume", args.resume), ("--method " + args.method, args.method != "lora"),
               ("--dora", args.dora), ("--quantize", args.quantize),
               ("--loraplus-ratio", args.loraplus_ratio),
               ("--frontend nnx", getattr(args, "frontend", "linen") != "linen"),
               (f"--grad-accum {args.grad_accum}", args.grad_accum > 1),
               ("--eval-every", args.eval_every), ("--tensorboard", args.tensorboard),
               (f"--init {args.init}", args.init not in ("default", "gaussian"))]
    for flag, given in refused:
        if given:
            raise ValueError(f"--sweep trains plain LoRA adapters on one shared frozen base: "
                             f"{flag} is not supported with it (run those one at a time)")


def finetune(args: argparse.Namespace) -> int:
    """`lora-jax finetune --sweep ...`: train every point, write its run folder and the summary.
    Returns 0, or `EXIT_DIVERGED` when some point's loss stopped being finite (its folder
    says so; the others are written as usual)."""
    _check(args)
    grid = points(args.sweep)
    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder: pick another one")
    check_writable(out)
    start = time.perf_counter()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from lora_jax.multi import sweep
    from lora_jax.train import data
    from lora_jax.train import loop as train

    loaded, task, (train_a, val_a, test_a), steps = prepare(args)
    n_train = len(train_a["input_ids"])
    point_args = [argparse.Namespace(**{**vars(args), "sweep": None, "out": str(out / name(p)),
                                        "lr": args.lr or DEFAULT_LR["lora"],
                                        **{KEYS[k]: v for k, v in p.items()}})
                  for p in grid]
    setups = [setup_method(loaded, task, "lora", **adapter_options(a), lr=a.lr, steps=steps,
                           **optimizer_flags(args))
              for a in point_args]
    sw = sweep.stack([(s.params, s.config) for s in setups],
                     hyperparams={"lr": np.asarray([a.lr for a in point_args], np.float32)},
                     seeds=[a.seed for a in point_args])
    print(f"sweep of {sw.size} LoRA points on {args.model} ({loaded.model_type}, {task}): "
          f"{n_train} train {'blocks' if task == 'lm' else 'examples'}, {steps} steps of "
          f"{args.batch_size} x {args.seq_len}; one compiled step for all points")

    def tx(lr: Any) -> Any:
        return training_tx(lr, steps, **optimizer_flags(args))

    seeds = sorted(set(sw.seeds))
    per_point = len(seeds) > 1
    step_fn = sweep.make_step(setups[0].forward, task, tx, batch_axis=0 if per_point else None)
    trainable, state = sw.trainable, sweep.init_state(sw, tx)
    orders = {s: data.batch_indices(n_train, args.batch_size, s) for s in seeds}
    step_losses, tokens, first = [], 0, 0.0
    clock = time.perf_counter()
    for i in tqdm(range(steps), disable=args.no_progress, unit="step", dynamic_ncols=True):
        index = {s: next(order) for s, order in orders.items()}
        picks = [index[s] for s in sw.seeds]
        batch = {k: np.stack([v[p] for p in picks]) if per_point else v[picks[0]]
                 for k, v in train_a.items()}
        trainable, state, loss = step_fn(trainable, sw.scales, sw.frozen, state, batch,
                                         sweep.dropout_keys(sw, i))
        step_losses.append(loss)
        if i == 0:
            jax.block_until_ready(loss)
            first = time.perf_counter() - clock
        else:
            tokens += int(batch["attention_mask"].sum()) // (sw.size if per_point else 1)
    losses = np.asarray(jnp.stack(step_losses, axis=1))  # [K, steps]
    seconds = time.perf_counter() - clock
    steady = max(seconds - first, 1e-9)
    steps_per_second = (steps - 1) / steady if steps > 1 else None

    key = "accuracy" if task == "classify" else "perplexity"
    rows, status = [], 0
    for k, ((params, _), setup, a, point) in enumerate(zip(sweep.unstack(sw, trainable), setups,
                                                            point_args, grid, strict=True)):
        folder = Path(a.out)
        folder.mkdir()
        finite = np.isfinite(losses[k])
        point_losses = [float(x) for x in losses[k]]
        metrics: dict[str, Any] = {
            "model": loaded.source, "model_type": loaded.model_type, "task": task,
            "method": "lora", "data": args.data, "steps": steps, "lr": a.lr,
            "sweep_point": point, "sweep_size": sw.size, "losses": point_losses,
            "train_seconds_this_process": seconds, "first_step_seconds": first,
            "step_seconds": None if steps_per_second is None else 1 / steps_per_second,
            "tokens_per_second": tokens / steady, "device": str(jax.devices()[0].platform)}
        write_json(folder / "run_config.json", run_config(a, folder))
        write_json(folder / "losses.json", point_losses, indent=None)
        if not finite.all():
            status = EXIT_DIVERGED
            bad = int(np.argmin(finite)) + 1
            metrics |= {"status": "diverged", "diverged_at_step": bad}
            val: dict[str, float | None] = {key: None}
            test = val
            print(f"{name(point)}: diverged at step {bad} (lower its lr); no adapter written")
        else:
            val = train.evaluate(setup.forward, task, params, val_a, 64)
            test = train.evaluate(setup.forward, task, params, test_a, 64)
            with new_folder(folder / "adapter") as tmp:
                save_adapter(tmp, params, setup, loaded, task, "lora", args.prompt_tokens)
            plot_losses(point_losses, folder / "loss.png", f"{name(point)}: {args.data}")
            metrics |= {"status": "finished", "validation": val, "test": test}
        write_json(folder / "metrics.json", metrics)
        rows.append({"point": name(point), **point, "status": metrics["status"],
                     "final_loss": point_losses[-1], f"validation_{key}": val[key],
                     f"test_{key}": test[key], "steps_per_second": steps_per_second})
    _summary(out, rows, key, sw.size, steps, seconds, first)
    print(f"wrote {out}/: {sw.size} run folders, summary.json, summary.md "
          f"({time.perf_counter() - start:.0f} s)")
    return status


def _summary(out: Path, rows: list[dict[str, Any]], key: str, size: int, steps: int,
             seconds: float, first: float) -> None:
    """summary.json (every point's row and the sweep's timing) and summary.md (a table)."""
    write_json(out / "summary.json", {"points": rows, "sweep_size": size, "steps": steps,
                                          "train_seconds": seconds,
                                          "first_step_seconds": first})
    shown = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    columns = ["point", "status", "final_loss", f"validation_{key}", f"test_{key}",
               "steps_per_second"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(shown(row[c]) for c in columns) + " |" for row in rows]
    note = (f"\n{size} points trained together in one compiled step: {steps} steps in "
            f"{seconds:.1f} s ({first:.1f} s of it the first step, with compilation); "
            "steps/s counts sweep steps after the first (each advances every point).\n")
    write_bytes(out / "summary.md", ("\n".join(lines) + "\n" + note).encode())
