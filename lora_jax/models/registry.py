"""Architectures: one record per HF `model_type` holding every fact lora_jax uses about it.

An `Architecture` names the module that implements it and says what the loaders, peft interop and
the `lora-jax` command need: the transformers classes it mirrors, its layer stacks, whether its
PyTorch weights are `[in, out]`, peft's default targets, the word-embedding table, the default
task. peft io (`lora_jax.peft.files`) reads the records registered into it here, so it never
imports the models.

    >>> arch = architecture("gpt2")
    >>> arch.stacks, arch.default_targets, arch.fan_in_fan_out
    (('transformer.h',), ('c_attn',), True)

The implementing module (`arch.module`, e.g. `lora_jax.models.gpt2`) has the same small
interface for every architecture, so the loaders need no per-model code:

- `Config`: a frozen dataclass of the architecture's hyperparameters.
- `config_from_hf(hf_config: dict) -> Config`: from an HF `config.json` dict.
- `build(config, *, dtype, param_dtype, scan_layers, remat_policy, task) -> nn.Module`.
- `params_from_hf(state_dict: dict[str, np.ndarray], config, *, scan_layers, convert) -> params`:
  HF PyTorch tensor names -> the Flax params tree (errors name missing/extra/misshaped tensors).

Unscanned layers of a stack are named `h_0, h_1, ...`; a scanned stack is one module named `h`
whose params carry a leading layer axis. Apart from that, Flax module paths equal the HF PyTorch
module paths, so peft's target names work unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from lora_jax.peft import files as peft_io


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Every fact about one HF architecture.

    - `model_type`: HF's `model_type` (config.json); `implementation`: the module implementing it.
    - `hf_classes`: the transformers classes it mirrors (the first is the default); `tasks` maps
      a class to the `task` its `build` takes, for architectures with several heads.
    - `stacks`: dotted paths of the per-layer lists (e.g. `transformer.h`).
    - `default_targets`: peft's default `target_modules` for it (what `lora-jax finetune` adapts).
    - `word_embeddings`: the word-embedding table's path (prompt-tuning).
    - `task`: the default task (`lm`, `classify` or `seq2seq`); `classifier`: the classification
      head's module name, trained in full (None: not a classifier); `base_model_prefix`: HF's
      `base_model_prefix`, the key of the base model's params in the classifier.
    - `fan_in_fan_out`: the PyTorch weights are `[in, out]` (GPT-2's Conv1D), so they are not
      transposed to torch's `[out, in]`; peft's `fan_in_fan_out`.
    - `peft_unused`: {module: why} for modules whose peft adapter the PyTorch model never calls.
    - `hf_module`: the transformers package name (`transformers.models.<hf_module>`), default
      `model_type`.
    - `parameter_order`: {module name: its parameters in PyTorch's order} for modules with
      several weights peft adapts by name (`target_parameters`; MoE experts).
    - `settings`: the implementation's facts about this family (the decoder's switches, see
      `lora_jax.models.decoder.config_from_hf`).
    """

    model_type: str
    implementation: str
    hf_classes: tuple[str, ...]
    stacks: tuple[str, ...]
    default_targets: tuple[str, ...]
    word_embeddings: str
    task: str = "lm"
    tasks: Mapping[str, str] = dataclasses.field(default_factory=dict)
    classifier: str | None = None
    base_model_prefix: str | None = None
    fan_in_fan_out: bool = False
    peft_unused: Mapping[str, str] = dataclasses.field(default_factory=dict)
    hf_module: str | None = None
    parameter_order: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def module(self) -> ModuleType:
        """The implementing module (imported on first use)."""
        return importlib.import_module(self.implementation)

    @property
    def base_model_class(self) -> str:
        """The transformers class peft records (`auto_mapping`)."""
        return self.hf_classes[0]

    @property
    def parent_library(self) -> str:
        """The transformers module defining the classes (peft's `auto_mapping`)."""
        name = self.hf_module or self.model_type
        return f"transformers.models.{name}.modeling_{name}"


# The families of `lora_jax.models.decoder`: (model_type, HF class, default targets, transformers
# package, the decoder's switches and how to read the family's config.json).
_GEMMA = {"gemma_norms": True, "sandwich_norms": True, "scale_embeddings": True,
          "renames": {"hidden_activation": "hidden_act"},
          "defaults": {"tie_word_embeddings": True}}
# transformers' fused experts define gate_up_proj, then down_proj (peft nests in that order).
_EXPERTS = {"experts": ("gate_up_proj", "down_proj")}
_DECODERS: tuple[tuple[str, str, tuple[str, ...], str | None, dict[str, Any]], ...] = (
    # HF's Llama has no sliding window, whatever its config.json says.
    ("llama", "LlamaForCausalLM", ("q_proj", "v_proj"), None, {"sliding_window": None}),
    ("qwen2", "Qwen2ForCausalLM", ("q_proj", "v_proj"), None,
     {"qkv_bias": True, "sliding_pattern": "after:max_window_layers"}),
    ("qwen3", "Qwen3ForCausalLM", ("q_proj", "v_proj"), None,
     {"qk_norm": True, "sliding_pattern": "after:max_window_layers"}),
    ("mistral", "MistralForCausalLM", ("q_proj", "v_proj"), None, {}),
    ("gemma2", "Gemma2ForCausalLM", ("q_proj", "v_proj"), None,
     {**_GEMMA, "sliding_pattern": "alternate:2"}),
    ("gemma3_text", "Gemma3ForCausalLM", ("q_proj", "v_proj"), "gemma3",
     {**_GEMMA, "qk_norm": True, "sliding_pattern": "alternate:6"}),
    # peft has no default for Phi-3; its fused qkv_proj is the attention's only input projection.
    ("phi3", "Phi3ForCausalLM", ("qkv_proj",), None, {"fused_qkv": True, "fused_gate_up": True}),
    ("qwen3_moe", "Qwen3MoeForCausalLM", ("q_proj", "v_proj"), None,
     {"qk_norm": True, "defaults": {"norm_topk_prob": False},
      "renames": {"num_local_experts": "num_experts"},
      "unsupported": {"mlp_only_layers": [], "decoder_sparse_step": 1},
      "expert_files": {"prefix": "mlp", "gate": "gate_proj", "up": "up_proj",
                       "down": "down_proj"}}),
    ("mixtral", "MixtralForCausalLM", ("q_proj", "v_proj"), None,
     {"renames": {"num_local_experts": "num_experts"},
      "expert_files": {"prefix": "block_sparse_moe", "gate": "w1", "up": "w3", "down": "w2"}}),
)
ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("gpt2", "lora_jax.models.gpt2", ("GPT2LMHeadModel",), ("transformer.h",),
                 ("c_attn",), "transformer.wte", fan_in_fan_out=True),
    Architecture("bert", "lora_jax.models.bert", ("BertModel", "BertForSequenceClassification"),
                 ("encoder.layer", "bert.encoder.layer"), ("query", "value"),
                 "bert.embeddings.word_embeddings", task="classify",
                 tasks={"BertModel": "base", "BertForSequenceClassification": "classify"},
                 classifier="classifier", base_model_prefix="bert"),
    *(Architecture(model_type, "lora_jax.models.decoder", (hf_class,), ("model.layers",),
                   targets, "model.embed_tokens", hf_module=hf_module, settings=settings,
                   parameter_order=_EXPERTS if "expert_files" in settings else {})
      for model_type, hf_class, targets, hf_module, settings in _DECODERS),
    Architecture("bloom", "lora_jax.models.bloom", ("BloomForCausalLM",), ("transformer.h",),
                 ("query_key_value",), "transformer.word_embeddings"),
    # peft wraps `shared`, but transformers 5's T5 looks tokens up through the encoder's and
    # decoder's `embed_tokens` (the same table, other module objects): that adapter is unused.
    Architecture("t5", "lora_jax.models.t5", ("T5ForConditionalGeneration",),
                 ("encoder.block", "encoder.block.layer", "decoder.block", "decoder.block.layer"),
                 ("q", "v"), "shared", task="seq2seq",
                 peft_unused={"shared": "T5 looks up through encoder/decoder.embed_tokens"}),
)}


def architecture(model_type: str | None) -> Architecture:
    """The record of an HF `model_type`; a ValueError listing the supported ones otherwise.

    >>> architecture("qwen9")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: unknown architecture 'qwen9': lora_jax has reference models for ['bert', ...]
    """
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {model_type!r}: lora_jax has reference models "
                         f"for {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def of_module(module: Any) -> tuple[Architecture, str]:
    """The record of a reference model module and the HF class it mirrors (its class name, or
    for the decoder families the family's class, from `module.config.model_type`)."""
    name = type(module).__name__
    for arch in ARCHITECTURES.values():
        if name in arch.hf_classes:
            return arch, name
    model_type = getattr(getattr(module, "config", None), "model_type", "")
    family = ARCHITECTURES.get(model_type)
    if family is not None and type(module).__module__ == family.implementation:
        return family, family.hf_classes[0]
    classes = sorted(c for a in ARCHITECTURES.values() for c in a.hf_classes)
    raise ValueError(f"lora_jax mirrors the HF classes {classes}, not {name}")


# peft io reads architecture facts from here; the core never imports the models.
for _arch in ARCHITECTURES.values():
    peft_io.register_architecture(_arch.model_type, _arch)
