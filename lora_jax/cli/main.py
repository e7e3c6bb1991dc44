"""`lora-jax`: fine-tune, generate with and merge LoRA adapters from the command line.

    lora-jax finetune                       # MiniLM + BBC News topics, LoRA r=8 on query/value
    lora-jax finetune --model smollm2 --task lm --data notes.txt --steps 200
    lora-jax finetune --resume runs/20250101-120000      # after Ctrl-C
    lora-jax finetune --sweep lr=1e-4,3e-4,1e-3 --sweep r=8,16 --out runs/sweep   # 6 adapters
    lora-jax generate --model smollm2 --adapter runs/X/adapter --prompt "The match"
    lora-jax merge --adapter runs/X/adapter --out merged/

A user error (bad flags, missing or damaged files, unknown models) is one line on stderr and
exit status 2; an unwritable file (a full disk) 1, what was saved kept; a diverging run 3, its
last finite checkpoint kept; Ctrl-C 130 after saving. Nothing is written over an input.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lora_jax import __version__
from lora_jax.cli import finetune as run_finetune
from lora_jax.cli import sweep
from lora_jax.cli.devices import parse_mesh
from lora_jax.cli.finetune import EXIT_DIVERGED, EXIT_INTERRUPTED, LAUNCH, NOT_SAVED
from lora_jax.cli.generate import generate
from lora_jax.cli.merge import merge
from lora_jax.cli.method import METHODS, SCHEDULES
from lora_jax.core.jsonfile import read_json
from lora_jax.train.metrics import INSTALL_TENSORBOARD

EXIT_USAGE = 2
__all__ = ["EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_USAGE", "build_parser", "main"]
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


class UsageError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# --- the command line ----------------------------------------------------------------------------

def _init(text: str) -> str:
    """--init: "default" (peft's True) or a LoraConfig init_lora_weights string, kept as text
    so that a saved run_config.json parses again on --resume."""
    from lora_jax import LoraConfig

    try:
        LoraConfig(init_lora_weights=True if text == "default" else text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("LoraConfig.init_lora_weights", "--init")
                                         ) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The `lora-jax` argument parser (subcommands finetune, generate, merge)."""
    parser = _Parser(prog="lora-jax", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ft = sub.add_parser("finetune", help="fine-tune a model with LoRA (or full / prompt / head)")
    ft.add_argument("--model", default="minilm",
                    help="minilm | smollm2 | an HF model folder | a .gguf file (default minilm)")
    ft.add_argument("--task", choices=("classify", "lm", "seq2seq"),
                    help="default: classify for encoders, lm for causal LMs, seq2seq for "
                    "encoder-decoders (T5)")
    ft.add_argument("--data", default="bbc",
                    help='bbc | a text file | a .jsonl file of {"text", "label"} (seq2seq: of '
                    '{"input", "target"}; causal LMs also: instruction data of {"prompt", '
                    '"completion"} or {"messages"}, loss on completions only) (default bbc)')
    ft.add_argument("--method", choices=METHODS, default="lora",
                    help="lora, vera or lokr (peft adapters: the run saves peft's folder), or "
                    "full, prompt, head (default lora)")
    ft.add_argument("--r", type=_number(int, 1), default=8,
                    help="adapter rank (default 8; VeRA: its shared projections' rank)")
    ft.add_argument("--alpha", type=_number(float, 0, low_open=True), default=16.0,
                    help="lora_alpha, LoKr's alpha (16); VeRA has none")
    ft.add_argument("--dropout", type=_number(float, 0, 1, high_open=True), default=0.05,
                    help="lora_dropout / VeRA's vera_dropout, in [0, 1) (0.05); LoKr has none")
    ft.add_argument("--d-initial", type=_number(float, 0), metavar="D",
                    help="VeRA: the initial value of every vera_lambda_d (peft's 0.1)")
    ft.add_argument("--projection-prng-key", type=_number(int, 0, MAX_SEED), metavar="SEED",
                    help="VeRA: the seed of the shared random projections (peft's 0)")
    ft.add_argument("--decompose-both", action="store_true", default=None,
                    help="LoKr: factor w1 into two rank-r matrices too (peft's decompose_both)")
    ft.add_argument("--decompose-factor", type=int, metavar="N",
                    help="LoKr: split each size as N x size/N when N divides it (peft's "
                    "decompose_factor; -1, the default: near the square root)")
    ft.add_argument("--rank-dropout", type=_number(float, 0, 1, high_open=True), metavar="P",
                    help="LoKr: drop each output feature of the update with probability P while "
                    "training (peft's rank_dropout, 0)")
    ft.add_argument("--module-dropout", type=_number(float, 0, 1, high_open=True), metavar="P",
                    help="LoKr: drop a layer's whole update with probability P while training "
                    "(peft's module_dropout, 0)")
    ft.add_argument("--dora", action="store_true",
                    help="DoRA: train a magnitude per output feature too (peft's use_dora)")
    ft.add_argument("--init", type=_init, default="default", metavar="INIT",
                    help="factor initialisation: default, gaussian, pissa, pissa_niter_K or olora "
                         "(pissa / olora start from the top singular directions; the saved "
                         "adapter is converted to apply to the original base)")
    ft.add_argument("--loraplus-ratio", type=_number(float, 0, low_open=True), metavar="RATIO",
                    help="LoRA+: B factors (and 1-D trainables) learn RATIO x faster (e.g. 16)")
    _quantize_option(ft, "QLoRA: hold the frozen kernels")
    targets = ft.add_mutually_exclusive_group()
    targets.add_argument("--targets", help="comma-separated target_modules (default: the "
                         "model's attention query/value projections)")
    targets.add_argument("--target-regex", metavar="REGEX",
                         help="target_modules as one regex on whole module paths (peft's "
                         r"fullmatch), e.g. 'encoder\..*SelfAttention\.(q|v)' for T5's "
                         "encoder self-attention only")
    length = ft.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_number(int, 1), help="training steps")
    length.add_argument("--epochs", type=_number(float, 0, low_open=True),
                        help="epochs (default 2)")
    ft.add_argument("--batch-size", type=_number(int, 1), default=16)
    ft.add_argument("--seq-len", type=_number(int, 1), default=64,
                    help="tokens per example / LM block (default 64)")
    ft.add_argument("--stream", action="store_true",
                    help="--task lm: read the .txt / .jsonl --data file line by line as training "
                    "goes, never whole (each process only its byte ranges), tokenized into "
                    "--seq-len rows and shuffled in a bounded seeded buffer; needs --steps; no "
                    "validation or test split; resumes exactly")
    ft.add_argument("--packing", action="store_true",
                    help="instruction data: pack several examples into each --seq-len row, "
                    "attention kept inside each example (the loss of the examples unpacked)")
    ft.add_argument("--lr", type=_number(float, 0, low_open=True),
                    help="peak learning rate (default: lora 3e-3, head 1e-2, full 5e-5, "
                    "prompt 3e-2)")
    ft.add_argument("--prompt-tokens", type=_number(int, 1), default=20,
                    help="soft-prompt length for --method prompt (20)")
    ft.add_argument("--seed", type=_number(int, 0, MAX_SEED), default=0)
    ft.add_argument("--limit", type=_number(int, 1),
                    help="use at most this many examples of each split (quick trials)")
    ft.add_argument("--save-every", type=_number(int, 0), default=0,
                    help="also checkpoint every N steps (default: at the end and on Ctrl-C)")
    ft.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="compute dtype of the model (activations, matmuls); the LoRA factors "
                    "and optimizer state stay float32 (default float32)")
    ft.add_argument("--param-dtype", choices=DTYPES, default="float32",
                    help="dtype the frozen base weights are held in (default float32)")
    ft.add_argument("--grad-accum", type=_number(int, 1), default=1, metavar="K",
                    help="accumulate K micro-batches of --batch-size per update, in one "
                    "compiled step: equal to a K x larger batch in the memory of one (default 1)")
    ft.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                    help="learning rate after the warmup: constant, linear or cosine decay to "
                    "0 at the last step (default cosine)")
    ft.add_argument("--warmup-steps", type=_number(int, 0), metavar="N",
                    help="linear warmup from 0 to --lr over N steps (default 10%% of the steps)")
    ft.add_argument("--weight-decay", type=_number(float, 0), metavar="WD",
                    help="AdamW's decoupled weight decay (default 0.01; 0 for --method prompt)")
    ft.add_argument("--max-grad-norm", type=_number(float, 0), default=1.0, metavar="NORM",
                    help="clip the gradient's global norm to NORM; 0: no clipping (default 1)")
    ft.add_argument("--eval-every", type=_number(int, 1), metavar="N",
                    help="evaluate on the validation split every N steps (logged in "
                    "metrics.jsonl) and keep the adapter of the lowest validation loss in "
                    "OUT/best_adapter")
    ft.add_argument("--tensorboard", action="store_true",
                    help="also write the per-step metrics as TensorBoard scalars in "
                    f"OUT/tensorboard (needs tensorboardX: {INSTALL_TENSORBOARD})")
    ft.add_argument("--out", help="output folder (default runs/<timestamp>)")
    ft.add_argument("--resume", metavar="DIR",
                    help="continue the interrupted run in DIR with its saved settings (only "
                    "--steps / --epochs / --save-every / --eval-every / --tensorboard / "
                    "--no-progress and where it runs: --mesh and the multi-host flags, may "
                    "differ)")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.add_argument("--mesh", type=parse_mesh, metavar="AXES",
                    help="the device mesh, e.g. data=2,fsdp=4 (sizes multiply to the device "
                    "count): the global --batch-size splits over data x fsdp, fsdp also "
                    "shards the frozen base and the factors, tensor splits the layers (GPT-2 "
                    "and the decoder families). Default: data-parallel over every device (one "
                    "process: the most devices that divide --batch-size)")
    ft.add_argument("--coordinator", metavar="HOST:PORT",
                    help="multi-host: process 0's address, the same on every host, with "
                    "--num-processes and --process-id (default: JAX_COORDINATOR_ADDRESS, or a "
                    "SLURM / Open MPI job of several tasks; else one process)")
    ft.add_argument("--num-processes", type=_number(int, 1), metavar="N",
                    help="multi-host: how many processes (one per host) run this command")
    ft.add_argument("--process-id", type=_number(int, 0), metavar="I",
                    help="multi-host: this process's number, 0 to N-1 (0 prints and writes the "
                    "adapter)")
    types = {action.dest: action.type for action in ft._actions if callable(action.type)}
    ft.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                    type=lambda text: sweep.axis(text, types),
                    help="train one LoRA adapter per point of these values (lr, r, lora_alpha, "
                    "seed; repeat the flag for a cartesian product) together in one compiled "
                    "step on one frozen base: a run folder per point under --out and summary.md")
    ft.add_argument("--frontend", choices=("linen", "nnx"), default="linen",
                    help="train the flax.linen model (default) or its Flax NNX twin (GPT-2, "
                    "Llama; --method lora); the adapter files are the same")

    gen = sub.add_parser("generate", help="continue a prompt with a causal LM, or decode from it "
                         "with an encoder-decoder (T5); optionally with an adapter")
    gen.add_argument("--model", default="smollm2")
    gen.add_argument("--adapter", action="append",
                     help="a peft adapter folder (e.g. runs/X/adapter); repeat it to give each "
                     "--prompt its own adapter (none: the base alone), run as one batch")
    gen.add_argument("--prompt", required=True, action="append",
                     help="the text to continue; repeat it for several prompts")
    gen.add_argument("--max-new-tokens", type=_number(int, 1), default=40)
    gen.add_argument("--temperature", type=_number(float, 0), default=0.0,
                     help="0 = greedy (default)")
    gen.add_argument("--top-k", type=_number(int, 1))
    gen.add_argument("--top-p", type=_number(float, 0, 1, low_open=True))
    gen.add_argument("--seed", type=_number(int, 0, MAX_SEED), default=0)
    _quantize_option(gen, "generate on the base a QLoRA adapter trained on, its kernels")

    mg = sub.add_parser("merge", help="fold an adapter into its base; write HF safetensors")
    mg.add_argument("--adapter", required=True, help="a peft adapter folder")
    mg.add_argument("--model", help="the base model (default: the adapter's base_model path)")
    mg.add_argument("--out", required=True)
    _quantize_option(mg, "merge into the dequantized base a QLoRA adapter trained on, its "
                     "kernels")
    return parser


MAX_SEED = 2**31 - 1
DTYPES = ("float32", "bfloat16")
# Flags that do not change the trained state: a resumed run may give new values.
RESUME_MAY_CHANGE = ("steps", "epochs", "save_every", "no_progress", "eval_every",
                     "tensorboard", *LAUNCH)
MAY_CHANGE = ("--steps, --epochs, --save-every, --eval-every, --tensorboard, --mesh and the "
              "multi-host flags")


def _quantize_option(parser: argparse.ArgumentParser, purpose: str) -> None:
    parser.add_argument("--quantize", choices=("nf4", "int8", "gguf"),
                        help=f"{purpose} as NF4 (4-bit), int8, or (a .gguf model) the file's own "
                        "Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K blocks; quantized tensor by "
                        "tensor as they are read")


def _number(kind: type, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False) -> Any:
    """An argparse type: a finite `kind` in [low, high] (open ends where asked)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            allowed = _range_text(kind, low, high, low_open, high_open)
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _range_text(kind: type, low: float | None, high: float | None, low_open: bool,
                high_open: bool) -> str:
    if kind is int and high is None and low in (0, 1):
        return "positive" if low == 1 else "non-negative"
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _explicit_flags(argv: Sequence[str]) -> dict[str, Any]:
    """The finetune options given on the command line (not defaults), by dest."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices["finetune"]._actions:
        action.default = argparse.SUPPRESS
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if k != "command"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lora-jax` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Orbax logs a failed save's traceback from its threads; the error is reported once, here.
    logging.getLogger("absl").addFilter(_not_orbax_errors)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "finetune":
            args.given = _explicit_flags(argv)
        command = {"finetune": finetune, "generate": generate, "merge": merge}[args.command]
        return command(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except _USER_ERRORS as err:
        print(f"lora-jax: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # a full disk, a vanished folder: one line, not a traceback
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        # One write: tensorstore's threads may be printing tracebacks of the same failure.
        sys.stderr.write(f"lora-jax: error: {err.strerror or err}{where}\n")
        return 1
    except KeyboardInterrupt:
        print("lora-jax: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _not_orbax_errors(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or "orbax" not in record.pathname


# --- resume: the saved settings, and which flags may differ --------------------------------------

def _resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """The saved run's settings (re-checked like flags), with the flags given now that may
    change on resume; a flag that would change the run is refused."""
    folder = Path(args.resume)
    saved_file = folder / "run_config.json"
    if not saved_file.is_file():
        raise ValueError(f"--resume {folder}: not a lora-jax run folder (no run_config.json)")
    saved = read_json(saved_file)
    if not isinstance(saved, dict):
        raise ValueError(f"{saved_file} is not a JSON object")
    argv = ["finetune"]
    for key, value in saved.items():
        if key in NOT_SAVED or value is None or value is False:
            continue
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    try:
        fields = vars(build_parser().parse_args(argv))
    except UsageError as err:
        raise ValueError(f"{saved_file}: {str(err).split(': ', 1)[-1]}") from None
    given = dict(getattr(args, "given", {}))
    if given.get("out") is not None and Path(given["out"]).resolve() != folder.resolve():
        raise ValueError(f"--resume {folder} writes to its own folder: drop --out {given['out']}")
    changes = {k: v for k, v in given.items()
               if k not in ("resume", "out", "no_progress") and fields.get(k) != v}
    refused = [k for k in changes if k not in RESUME_MAY_CHANGE]
    if refused:
        listed = ", ".join(f"--{k.replace('_', '-')} {changes[k]} (saved: {fields.get(k)})"
                           for k in refused)
        raise ValueError(f"--resume {folder}: {listed} would change the run; only {MAY_CHANGE} "
                         "may differ. Start a new run with another --out to change it")
    for key, value in changes.items():
        was, fields[key] = fields.get(key), value
        if key in LAUNCH:  # where the run goes on, not what it trains
            continue
        print(f"resume: --{key.replace('_', '-')} {value} (was {was})"
              + ("; the learning-rate schedule now spans the new length"
                 if key in ("steps", "epochs") else ""))
        if key == "steps":
            fields["epochs"] = None
        elif key == "epochs":
            fields["steps"] = None
    fields.update(command="finetune", resume=str(folder), out=str(folder),
                  no_progress=args.no_progress)
    return argparse.Namespace(**fields)


# --- finetune: a run, a resumed run or a sweep ----------------------------------------------------

def finetune(args: argparse.Namespace) -> int:
    """`lora-jax finetune`: `lora_jax.cli.finetune.finetune` with the flags (a resumed run's saved
    ones); with --sweep, `lora_jax.cli.sweep.finetune`."""
    if getattr(args, "sweep", None):
        launch = [f"--{k.replace('_', '-')}" for k in LAUNCH if getattr(args, k, None)]
        if launch:
            raise ValueError(f"--sweep trains its adapters on one device: drop {launch[0]}")
        if getattr(args, "stream", False):
            raise ValueError("--sweep reads its data in memory: drop --stream")
        return sweep.finetune(args)
    if args.resume:
        args = _resumed_args(args)
    return run_finetune.finetune(args)


if __name__ == "__main__":
    sys.exit(main())
