"""Methods: LoRA (with DoRA, PiSSA / OLoRA inits, LoRA+, QLoRA), VeRA, LoKr, full
fine-tuning, prompt tuning and head-only training, set up on a loaded model as params, the
trainable selection, the forward and the optimizer.

    setup = setup_method(loaded, "classify", "lora", r=8, alpha=16, lr=3e-3, steps=100)
    trainable, frozen = lora_jax.split(setup.params, setup.config)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from lora_jax.cli.model import Loaded

METHODS = ("lora", "vera", "lokr", "full", "prompt", "head")
SCHEDULES = ("constant", "linear", "cosine")
ADAPTERS = ("lora", "vera", "lokr")  # the methods that save a peft adapter folder
# The flags of one method's own config fields (peft's names), by method.
OPTIONS = {"vera": ("d_initial", "projection_prng_key"),
           "lokr": ("decompose_both", "decompose_factor", "rank_dropout", "module_dropout")}

# VeRA trains only r + out numbers a layer and wants a larger rate (its paper: 1e-2 and up).
DEFAULT_LR = {"lora": 3e-3, "vera": 1e-2, "lokr": 3e-3, "head": 1e-2, "full": 5e-5,
              "prompt": 3e-2}


def method_options(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The `OPTIONS` fields of `method` among `given` (a flags namespace's dict; None: not
    given); a field of another method raises, naming its flag.

    >>> method_options("lokr", {"decompose_both": True, "d_initial": None, "lr": 1.0})
    {'decompose_both': True}
    """
    found = {name: given[name] for names in OPTIONS.values() for name in names
             if given.get(name) is not None}
    for name in found:
        if name not in OPTIONS.get(method, ()):
            owner = next(m for m, names in OPTIONS.items() if name in names)
            raise ValueError(f"--{name.replace('_', '-')} applies to --method {owner}")
    return found


@dataclasses.dataclass
class Setup:
    """A method applied to a model: full params, which of them train, the forward, optimizer."""

    params: dict[str, Any]
    config: Any  # LoraConfig: its split picks the trainable leaves
    forward: Any
    tx: Any
    is_lora: bool
    initial_params: Any = None  # after inject, when the init changed the base (PiSSA / OLoRA)
    schedule: Any = None  # the learning rate `tx` applies at optimizer count c: schedule(c)


def setup_method(loaded: Loaded, task: str, method: str, *, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.05, targets: str | Sequence[str] | None = None,
                 prompt_tokens: int = 20, lr: float = 1e-3, steps: int = 100,
                 seed: int = 0, dora: bool = False, init: bool | str = True,
                 loraplus_ratio: float | None = None, quantize: str | None = None,
                 options: Mapping[str, Any] | None = None, schedule: str = "cosine",
                 warmup_steps: int | None = None, weight_decay: float | None = None,
                 max_grad_norm: float = 1.0) -> Setup:
    """Params, trainable selection, forward and optimizer of `method` on `loaded`. `targets`:
    the adapter's target_modules (a list of names, or one regex string; None: the family's);
    `options`: the method's own config fields (`method_options`). VeRA reads `r` and `dropout`
    (its `vera_dropout`; it has no alpha), LoKr `r` and `alpha` (it has no input dropout: its
    `rank_dropout` / `module_dropout` are options). The optimizer's settings as `training_tx`
    takes them (`weight_decay` None: 0.01, 0 for prompt tuning)."""
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
    converts = init in ("pissa", "olora") or str(init).startswith("pissa_niter")
    if dora and converts:
        raise ValueError(f"--dora with --init {init}: a DoRA adapter trained from the residual "
                         "base cannot be converted to the original base; use one of them")
    if quantize and not lora_jax.quant.quantize.has_quantized(params):
        # QLoRA on a base loaded in float: the frozen kernels as NF4 / int8 (heads and trained
        # modules stay float). `load_model(..., quantize=)` gives the same tree while reading.
        params = lora_jax.quantize(params, quantize, modules_to_save=head)
    config: Any
    targets = targets if isinstance(targets, str) else tuple(targets or family.default_targets)
    adapter: dict[str, Any] = {"target_modules": targets, "modules_to_save": head or None}
    if method == "vera":
        config = lora_jax.VeraConfig(r=r, vera_dropout=dropout, **adapter, **(options or {}))
    elif method == "lokr":
        config = lora_jax.LoKrConfig(r=r, alpha=alpha, **adapter, **(options or {}))
    elif method == "lora":
        config = lora_jax.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=dora,
                                     init_lora_weights=init, **adapter)
    if method in ADAPTERS:
        params = lora_jax.inject(params, config, key, layouts=loaded.layouts())
        apply = lora_jax.wrap(apply, config)
        if converts:
            # The starting factors, copied: training donates the trainable buffers.
            from lora_jax.core.record import iter_records
            from lora_jax.core.targets import with_leaves

            initial = with_leaves(params, {
                item.path: {n: jax.numpy.array(item.module[n], copy=True)
                            for n in item.record.arrays} for item in iter_records(params)})
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
        args: tuple[Any, ...] = (batch["input_ids"], batch["attention_mask"])
        if "segment_ids" in batch:  # packed instruction data (checked: not with prompt tuning)
            return apply({"params": p}, *args, segment_ids=batch["segment_ids"], rngs=rngs)
        if task == "seq2seq":  # teacher forcing: the decoder reads the shifted targets
            args += (batch["decoder_input_ids"],)
        if method != "prompt":
            return apply({"params": p}, *args, rngs=rngs)
        model_params = {k: v for k, v in p.items() if k != "prompt"}
        out = apply({"params": model_params}, p["prompt"]["embedding"], *args, rngs=rngs)
        return out if task == "classify" else prompt_tuning.strip(out, prompt_tokens)

    if weight_decay is None:
        weight_decay = 0.01 if method != "prompt" else 0.0
    tx = training_tx(lr, steps, weight_decay=weight_decay, loraplus_ratio=loraplus_ratio,
                     schedule=schedule, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm)
    unit = unit_schedule(steps, schedule, warmup_steps)
    # `tx` updates the trainable half that `train.fit` differentiates (split once, combine for
    # the forward): no whole-tree `lora_jax.optimizer` wrapper is needed.
    return Setup(params, config, forward, tx, method in ADAPTERS, initial,
                 schedule=lambda count: lr * unit(count))


def unit_schedule(steps: int, schedule: str = "cosine", warmup_steps: int | None = None
                  ) -> Any:
    """The learning-rate multiplier at optimizer count c (an optax schedule): a linear warmup
    from 0 to 1 over `warmup_steps` (None: 10% of `steps`, at least 1), then `constant` (1),
    `linear` (to 0 at `steps`) or `cosine` (to 0 at `steps`).

    >>> round(float(unit_schedule(10, "linear", 2)(6)), 6)
    0.5
    """
    import optax

    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps
    after = max(1, steps - warmup)
    if schedule == "constant":
        decay = optax.schedules.constant_schedule(1.0)
    elif schedule == "linear":
        decay = optax.schedules.linear_schedule(1.0, 0.0, after)
    elif schedule == "cosine":
        decay = optax.schedules.cosine_decay_schedule(1.0, after)
    else:
        raise ValueError(f"--schedule {schedule}: use one of {', '.join(SCHEDULES)}")
    if not warmup:
        return decay
    return optax.schedules.join_schedules(
        [optax.schedules.linear_schedule(0.0, 1.0, warmup), decay], [warmup])


def training_tx(lr: Any, steps: int, *, weight_decay: float = 0.01,
                loraplus_ratio: float | None = None, schedule: str = "cosine",
                warmup_steps: int | None = None, max_grad_norm: float = 1.0) -> Any:
    """The finetune optimizer: global-norm clipping to `max_grad_norm` (0: none), then AdamW
    (`weight_decay`) with learning rate `lr` times `unit_schedule(steps, schedule,
    warmup_steps)` (LoRA+: B factors at `loraplus_ratio` x). `lr` may be an array (a sweep's
    per-point value, without LoRA+)."""
    import optax

    import lora_jax

    # Peak times a unit schedule: the peak may be traced (optax's schedule branches on it).
    unit = unit_schedule(steps, schedule, warmup_steps)

    def adamw(peak: Any) -> optax.GradientTransformation:
        return optax.adamw(lambda count: peak * unit(count), weight_decay=weight_decay)

    inner = adamw(lr) if not loraplus_ratio else lora_jax.loraplus(
        adamw, lr, loraplus_lr_ratio=loraplus_ratio)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), inner) if max_grad_norm else inner
