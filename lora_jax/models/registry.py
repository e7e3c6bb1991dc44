"""Architecture registry: HF `model_type` -> the lora_jax module that implements it.

Each architecture module (e.g. `lora_jax.models.gpt2`) exposes the same small interface, so the
loaders (`from_torch`, `from_pretrained`) and peft interop need no per-model code of their own:

- `Config`: a frozen dataclass of the architecture's hyperparameters.
- `config_from_hf(hf_config: dict) -> Config`: from an HF `config.json` dict.
- `build(config, *, dtype, param_dtype, scan_layers, remat_policy, task) -> nn.Module`.
- `params_from_hf(state_dict: dict[str, np.ndarray], config, *, scan_layers) -> params`:
  HF PyTorch tensor names -> the Flax params tree (errors name missing/extra/misshaped tensors).
- `HF_CLASSES`: names of the transformers classes it mirrors; optional `TASKS` maps an HF class
  name to the `task` that `build` / `params_from_hf(..., task=)` take, for architectures with
  several heads (BERT: base model or sequence classification).
- `LAYER_STACKS`: dotted paths of the per-layer lists (e.g. `("transformer.h",)`); unscanned
  layers are named `h_0, h_1, ...` and a scanned stack is one module named `h` whose params carry
  a leading layer axis. Apart from that, Flax module paths equal the HF PyTorch module paths.
- optional `FAN_IN_FAN_OUT` (default False): True when the PyTorch checkpoints store the
  projection weights [in, out] (GPT-2's Conv1D), so they are not transposed to torch's
  [out, in]; peft interop writes it as `fan_in_fan_out`.
- `DEFAULT_TARGETS`, `WORD_EMBEDDINGS`, `CLASSIFIER`, `DEFAULT_TASK`: what `lora-jax finetune`
  needs: peft's default `target_modules` for the architecture, the path of the word-embedding
  table (prompt-tuning), the classification head's module name, trained in full (None: not a
  classifier), and the default task (`classify`, `lm` or `seq2seq`); with a classifier,
  `BASE_MODEL_PREFIX` (HF's `base_model_prefix`), the key of the base model's params in it.
"""

import importlib
from types import ModuleType

from lora_jax.peft import files as peft_io

ARCHITECTURES = {
    "gpt2": "lora_jax.models.gpt2",
    "bert": "lora_jax.models.bert",
    "llama": "lora_jax.models.llama",
    "bloom": "lora_jax.models.bloom",
    "t5": "lora_jax.models.t5",
}


def architecture(model_type: str) -> ModuleType:
    """The lora_jax module for an HF `model_type`; a clear error for an unknown one."""
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {model_type!r}: lora_jax has reference models for "
            f"{sorted(ARCHITECTURES)}"
        )
    return importlib.import_module(ARCHITECTURES[model_type])


def _peft_facts(model_type: str) -> peft_io.Architecture:
    arch = architecture(model_type)
    return peft_io.Architecture(
        stacks=tuple(arch.LAYER_STACKS),
        fan_in_fan_out=bool(getattr(arch, "FAN_IN_FAN_OUT", False)),
        base_model_class=arch.HF_CLASSES[0],
        parent_library=f"transformers.models.{model_type}.modeling_{model_type}",
        peft_unused=dict(getattr(arch, "PEFT_UNUSED", {})),
    )


# peft io reads architecture facts from here; the core never imports the models.
for _name in ARCHITECTURES:
    peft_io.register_architecture(_name, lambda name=_name: _peft_facts(name))
