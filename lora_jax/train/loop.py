"""The training loop behind `lora-jax finetune`: a jitted step over the trainable half of the
params, evaluation, a tqdm progress bar, orbax checkpoints, and Ctrl-C that saves and stops.

A method is a `forward(params, batch, dropout_key) -> logits` (LoRA: `lora_jax.wrap`;
prompt-tuning: `lora_jax.train.prompt_tuning.wrap`) and an optax transformation; only the
trainable half is differentiated, updated and checkpointed. Batch `i` and its dropout key are
pure functions of (seed, i), so a resumed run repeats the uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.core.config import LoraConfig
from lora_jax.core.partition import combine
from lora_jax.train.data import batch_indices

Params = dict[str, Any]
Batch = Mapping[str, Any]
Forward = Callable[[Params, Batch, "jax.Array | None"], jax.Array]
# (arrays, indices of the global batch's rows) -> the batch the step reads (`batches`, `evaluate`).
Feed = Callable[[Mapping[str, np.ndarray], np.ndarray], Batch]


def host_rows(arrays: Mapping[str, np.ndarray], index: np.ndarray) -> Batch:
    """The default `Feed`: the rows `index` of `arrays`, as numpy (placed by `jax.jit`)."""
    return {k: v[index] for k, v in arrays.items()}


def batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int, start_step: int = 0,
            feed: Feed = host_rows) -> Iterator[Batch]:
    """`fit`'s batches of in-memory `arrays` (equal-length numpy arrays) from step `start_step`
    on: the rows `data.batch_indices(n, batch_size, seed, start_step)`, each batch made by
    `feed`. (`lora_jax.train.stream.Stream.batches` streams them from a file instead.)"""
    n = len(next(iter(arrays.values())))
    return (feed(arrays, index) for index in batch_indices(n, batch_size, seed, start_step))


class Interrupted(Exception):
    """Raised by `fit` after Ctrl-C, once the checkpoint of the last finished step is saved."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted after step {step}")
        self.step = step


class Diverged(Exception):
    """Raised by `fit` when a step's loss (or the trained state) is not finite. Nothing after the
    last finite step is checkpointed: `last_saved` is the newest checkpoint written by this call
    or before it (`start_step` of a resumed run; None if there is none), `losses` the finite
    losses from step 1 up to the bad step."""

    def __init__(self, step: int, loss: float | None, last_saved: int | None,
                 losses: list[float]) -> None:
        what = (f"the loss of step {step} is {loss}" if loss is not None
                else f"the trained parameters or optimizer state are not finite after step {step}")
        super().__init__(f"training diverged: {what}")
        self.step, self.loss, self.last_saved, self.losses = step, loss, last_saved, losses


def _all_finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return all(bool(jnp.isfinite(x).all()) for x in leaves)


def _losses(task: str, logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per-example (`classify`), per-next-token (`lm`) or per-target-token (`seq2seq`)
    cross-entropies and their weights (`lm`: the `loss_mask` if any, else the attention mask)."""
    logits = logits.astype(jnp.float32)
    if task == "classify":
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return losses, jnp.ones_like(losses)
    if task == "lm":
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], batch["input_ids"][:, 1:])
        weights = batch["loss_mask"] if "loss_mask" in batch else batch["attention_mask"]
        return losses, weights[:, 1:].astype(jnp.float32)
    if task == "seq2seq":
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return losses, batch["label_mask"].astype(jnp.float32)
    raise ValueError(f"unknown task {task!r}: use 'classify', 'lm' or 'seq2seq'")


def task_loss(task: str, logits: jax.Array, batch: Batch) -> jax.Array:
    """Mean cross-entropy: over examples (`classify`), over next tokens where the attention
    mask (or the loss mask of instruction data) is 1 (`lm`) or over target tokens
    (`seq2seq`)."""
    losses, weights = _losses(task, logits, batch)
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def make_step(forward: Forward, task: str, tx: optax.GradientTransformation, accum: int = 1
              ) -> Callable[..., tuple[Params, Any, jax.Array]]:
    """jitted `step(trainable, frozen, opt_state, batch, key) -> (trainable, opt_state, loss)`.

    Gradients are taken with respect to `trainable` only (frozen weights get none); `trainable`
    and `opt_state` are donated. With `accum` K > 1 the batch is split into K micro-batches
    whose gradients are summed in a scan inside the one compiled step (one update, the memory
    of one micro-batch): the loss and update equal one step on the whole batch.
    """
    return jax.jit(train_step(forward, task, tx, accum), donate_argnums=(0, 2))


def train_step(forward: Forward, task: str, tx: optax.GradientTransformation, accum: int = 1
               ) -> Callable[..., tuple[Params, Any, jax.Array]]:
    """`make_step`'s step before `jax.jit` (e.g. vmapped over adapters by `multi.sweep`)."""

    def step(trainable: Params, frozen: Params, opt_state: Any, batch: Batch, key: jax.Array
             ) -> tuple[Params, Any, jax.Array]:
        def loss_of(t: Params) -> jax.Array:
            return task_loss(task, forward(combine(t, frozen), batch, key), batch)

        if accum == 1:
            loss, grads = jax.value_and_grad(loss_of)(trainable)
        else:
            loss, grads = _accumulated(forward, task, accum, trainable, frozen, batch, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def _accumulated(forward: Forward, task: str, accum: int, trainable: Params, frozen: Params,
                 batch: Batch, key: jax.Array) -> tuple[jax.Array, Params]:
    """(mean loss, its gradient) of `batch` as `accum` micro-batches in a scan: the weighted
    loss sums, weights and gradients of the sums are added up, then divided by the total weight,
    so the result is the whole batch's mean (micro-batch i's dropout key: fold_in(key, i))."""

    def sums(t: Params, micro: Batch, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        losses, weights = _losses(task, forward(combine(t, frozen), micro, k), micro)
        return (losses * weights).sum(), weights.sum()

    def add(carry: Any, xs: Any) -> tuple[Any, None]:
        total, count, grads = carry
        micro, i = xs
        (s, w), g = jax.value_and_grad(sums, has_aux=True)(trainable, micro,
                                                          jax.random.fold_in(key, i))
        return (total + s, count + w, jax.tree.map(jnp.add, grads, g)), None

    # Micro-batch i is rows i, i + K, ...: on a mesh each one spans every data-parallel device.
    micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1),
                         dict(batch))
    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jax.tree.map(jnp.zeros_like, trainable))
    (total, count, grads), _ = jax.lax.scan(add, init, (micro, jnp.arange(accum)))
    scale = 1.0 / jnp.maximum(count, 1.0)
    return total * scale, jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)


@functools.lru_cache(maxsize=16)
def _eval_sums(forward: Forward, task: str) -> Callable[..., tuple[jax.Array, ...]]:
    """jitted (loss sum, correct, count) of one batch; cached so that repeated evaluations of the
    same forward (before training, validation, test) compile once."""

    @jax.jit
    def sums(params: Params, batch: Batch, valid: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
        logits = forward(params, batch, None)
        losses, weights = _losses(task, logits, batch)
        weights = weights * valid.reshape(-1, *([1] * (losses.ndim - 1)))
        correct = jnp.asarray(0.0)
        if task == "classify":
            correct = ((logits.argmax(-1) == batch["labels"]) * weights).sum()
        return (losses * weights).sum(), correct, weights.sum()

    return sums


def evaluate(forward: Forward, task: str, params: Params, arrays: Mapping[str, np.ndarray],
             batch_size: int, feed: Feed = host_rows) -> dict[str, float | None]:
    """Loss and accuracy (`classify`) or loss and perplexity (`lm`, `seq2seq`) over all of `arrays`.
    An empty split gives None for every measure (and 0 examples / tokens), never a number.
    `feed` makes each batch (as in `fit`)."""
    n = len(arrays["input_ids"])
    sums = _eval_sums(forward, task)
    totals = np.zeros(3)
    for start in range(0, n, batch_size):
        # One compiled shape: the last batch is filled up with copies of its first row.
        index = np.arange(start, start + batch_size)
        valid = index < n
        batch = feed(arrays, np.where(valid, index, start))
        mask = feed({"valid": valid}, np.arange(batch_size))["valid"]
        totals += [float(x) for x in sums(params, batch, mask)]
    loss_sum, correct, count = totals
    # None for an empty split, or blocks whose mask leaves no next token to predict.
    loss = float(loss_sum / count) if count else None
    if task == "classify":
        return {"loss": loss, "accuracy": float(correct / count) if count else None,
                "examples": int(count)}
    return {"loss": loss, "perplexity": None if loss is None else float(np.exp(loss)),
            "tokens": int(count)}


@dataclasses.dataclass
class FitResult:
    """Final trainable params and optimizer state, and the loss of every step from step 1."""

    trainable: Params
    opt_state: Any
    losses: list[float]
    seconds: float  # wall time of the steps run, compilation included
    first_step_seconds: float  # the first step of this call: compilation + one step
    steps_run: int  # steps run by this call (fewer than len(losses) after a resume)
    tokens: int  # unpadded tokens seen by this call's steps after the first

    @property
    def tokens_per_second(self) -> float:
        """Unpadded tokens per second after the first step (no compilation)."""
        return self.tokens / max(self.seconds - self.first_step_seconds, 1e-9)

    @property
    def step_seconds(self) -> float:
        """Mean time of this call's steps after the first (no compilation)."""
        return (self.seconds - self.first_step_seconds) / max(1, self.steps_run - 1)


@contextlib.contextmanager
def _stop_flag() -> Iterator[threading.Event]:
    """SIGINT sets an event that the loop checks between steps (no half-finished step)."""
    stop = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if main else None
    try:
        yield stop
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def device_memory() -> dict[str, int]:
    """The largest `bytes_in_use` / `peak_bytes_in_use` over this process's devices, where jax
    reports them (GPU, TPU; empty on CPU)."""
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    return {f"device_{k}": max(int(s[k]) for s in stats if k in s)
            for k in ("bytes_in_use", "peak_bytes_in_use") if any(k in s for s in stats)}


def fit(
    forward: Forward,
    task: str,
    tx: optax.GradientTransformation,
    trainable: Params,
    frozen: Params,
    batches: Iterator[Batch],
    *,
    steps: int,
    seed: int,
    config: LoraConfig,
    opt_state: Any = None,
    start_step: int = 0,
    losses: list[float] | None = None,
    checkpointer: Any = None,
    save_every: int = 0,
    on_save: Callable[[int, list[float]], None] | None = None,
    progress: bool = True,
    step_fn: Callable[..., Any] | None = None,
    grad_accum: int = 1,
    schedule: Callable[[int], Any] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    eval_every: int = 0,
    on_eval: Callable[[int, Params], Mapping[str, Any]] | None = None,
) -> FitResult:
    """Train from `start_step` to `steps` on `batches`, the global batches of steps `start_step`,
    `start_step + 1`, ... (`batches(arrays, batch_size * grad_accum, seed, start_step)`, or a
    streamed file's: `lora_jax.train.stream`), each accumulating `grad_accum` micro-batches.
    Step i's dropout key is `fold_in(key(seed), i)`. A non-finite loss (or trained state) raises
    `Diverged`: nothing after the last finite step is checkpointed.

    With a `checkpointer` (an `AdapterCheckpointer`) the state is saved every `save_every` steps,
    at the end, and on Ctrl-C, after which `Interrupted` is raised; the checkpoint's `extra`
    holds the losses up to its step (`{"losses": [...]}`), and `on_save(step, losses)` is called
    after each save. `log(row)` gets one row per step: `step`, `loss`, `lr`
    (`schedule(step - 1)`, the rate of the step's update), `seconds` (since the previous row;
    the first includes compilation), `examples_per_second`, `tokens_per_second`, the device
    memory where jax reports it, and every `eval_every` steps what `on_eval(step, trainable)`
    returns.
    `step_fn` replaces `make_step(forward, task, tx, grad_accum)` (e.g. one jitted with a mesh's
    shardings). `trainable` and `opt_state` are donated: pass copies to keep them.
    """
    from tqdm.auto import tqdm

    step_fn = step_fn or make_step(forward, task, tx, grad_accum)
    opt_state = tx.init(trainable) if opt_state is None else opt_state
    losses = list(losses or [])[:start_step]
    base_key = jax.random.key(seed)
    bar = tqdm(total=steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)  # closed by the `with` below
    # Device losses not yet read, with their step's row (keeps dispatch asynchronous).
    pending: list[tuple[jax.Array, dict[str, Any]]] = []
    tokens = 0  # counted as the steps' rows are recorded (the device's count, read late)
    start_time = time.perf_counter()
    first_step_seconds, first_tokens = 0.0, None
    clock = {"last": start_time, "paused": 0.0}  # the previous row's time; evaluation's time

    last_saved = start_step if checkpointer is not None and start_step else None

    def record(value: jax.Array, row: dict[str, Any]) -> None:
        nonlocal tokens, first_tokens
        loss = float(value)
        if not math.isfinite(loss):
            raise Diverged(len(losses) + 1, loss, last_saved, list(losses))
        losses.append(loss)
        row["tokens"] = int(row["tokens"])
        tokens += row["tokens"]
        first_tokens = tokens if first_tokens is None else first_tokens
        if log is not None:
            now = time.perf_counter()
            seconds = max(now - clock["last"] - clock["paused"], 1e-9)
            clock.update(last=now, paused=0.0)
            row = {"step": row.pop("step"), "loss": loss, **row, "seconds": seconds,
                   "examples_per_second": row.pop("examples") / seconds,
                   "tokens_per_second": row.pop("tokens") / seconds, **device_memory()}
            log(row)

    def save(step: int) -> None:
        nonlocal last_saved
        while pending:
            record(*pending.pop(0))
        if not _all_finite((trainable, opt_state)):
            raise Diverged(step, None, last_saved, list(losses))
        if checkpointer is not None:
            checkpointer.save(step, trainable, opt_state, config, force=True,
                              extra={"losses": list(losses)})
            checkpointer.wait()
            last_saved = step
        if on_save is not None:
            on_save(step, losses)

    with _stop_flag() as stop, bar:
        step = start_step
        while step < steps:
            batch = next(batches)
            trainable, opt_state, loss = step_fn(trainable, frozen, opt_state, batch,
                                                 jax.random.fold_in(base_key, step))
            step += 1
            if step == start_step + 1:  # compilation + one step: not counted in tokens/s
                jax.block_until_ready(loss)
                first_step_seconds = time.perf_counter() - start_time
            # The global batch's unpadded tokens: a number, or (a batch on the mesh) an array
            # the device sums, read when the row is recorded.
            row: dict[str, Any] = {"step": step, "tokens": batch["attention_mask"].sum(),
                                   "examples": batch["attention_mask"].shape[0]}
            if schedule is not None:
                row["lr"] = float(schedule(step - 1))
            if eval_every and on_eval is not None and step % eval_every == 0:
                began = time.perf_counter()
                row.update(on_eval(step, trainable))
                clock["paused"] += time.perf_counter() - began
            pending.append((loss, row))
            if len(pending) > 1:  # read the previous step's loss, which is done by now
                record(*pending.pop(0))
                elapsed = time.perf_counter() - start_time - first_step_seconds
                bar.set_postfix(loss=f"{losses[-1]:.4f}",
                                tok_s=f"{(tokens - (first_tokens or 0)) / elapsed:,.0f}",
                                refresh=False)
            bar.update(1)
            if stop.is_set():
                save(step)
                raise Interrupted(step)
            if save_every and step % save_every == 0 and step < steps:
                save(step)
        save(step)
    return FitResult(trainable, opt_state, losses, time.perf_counter() - start_time,
                     first_step_seconds, step - start_step, tokens - (first_tokens or 0))
