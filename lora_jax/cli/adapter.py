"""Adapter folders: check one given with `--adapter` before anything is loaded, save a run's.

A LoRA run saves peft's folder (`adapter_config.json` + `adapter_model.safetensors`, through
`lora_jax.peft.files.save_peft`); the other methods save their trained weights as
`trained_weights.safetensors` with a `method.json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_jax.cli.files import read_json
from lora_jax.cli.method import Setup
from lora_jax.cli.model import Loaded

PEFT_TASK_TYPES = {"classify": "SEQ_CLS", "lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


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
