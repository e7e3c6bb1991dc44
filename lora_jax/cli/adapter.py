"""Adapter folders: check one given with `--adapter` before anything is loaded, save a run's.

A LoRA run saves peft's folder (`adapter_config.json` + `adapter_model.safetensors`, through
`lora_jax.peft.files.save_peft`); the other methods save their trained weights as
`trained_weights.safetensors` with a `method.json`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_jax.cli.files import write_json
from lora_jax.cli.method import Setup
from lora_jax.cli.model import Loaded

PEFT_TASK_TYPES = {"classify": "SEQ_CLS", "lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


def check_adapter(folder: Path) -> dict[str, Any]:
    """adapter_config.json's fields after checking the adapter folder before any model is
    loaded: its files as `lora_jax.peft.files.read_adapter` reads them (valid JSON, readable
    safetensors, float and finite factors) and the config's `r`, `lora_alpha` and `use_rslora`
    as `LoraConfig` checks them. Each problem is a ValueError naming the file."""
    from lora_jax import LoraConfig
    from lora_jax.peft.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--adapter {folder}: no such folder")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise ValueError(f"--adapter {folder}: no {name} there")
    fields, _ = read_adapter(folder)
    checked = {k: fields[k] for k in ("r", "lora_alpha", "use_rslora") if k in fields}
    try:
        LoraConfig(**checked)
    except ValueError as err:
        raise ValueError(f"{folder / CONFIG_NAME}: {str(err).replace('LoraConfig.', '')}"
                         ) from None
    return fields


def save_adapter(folder: Path, params: Mapping[str, Any], setup: Setup, loaded: Loaded,
                 task: str, method: str, prompt_tokens: int) -> None:
    """LoRA: the peft adapter folder. Other methods: their trained weights as safetensors."""
    import numpy as np
    from safetensors.numpy import save_file

    from lora_jax import split
    from lora_jax.core.targets import iter_modules

    if setup.is_lora:
        from safetensors import SafetensorError

        from lora_jax.peft.files import save_peft

        try:
            save_peft(folder, params, setup.config, base_model_name_or_path=loaded.source,
                      task_type=PEFT_TASK_TYPES[task],
                      model_type=loaded.model_type, initial_params=setup.initial_params)
        except SafetensorError as err:  # e.g. "I/O error: No space left on device"
            raise OSError(f"cannot write {folder}: {err}") from err
        return
    folder.mkdir(parents=True, exist_ok=True)
    trainable = split(params, setup.config)[0]
    tensors = {f"{path}.{name}": np.asarray(value)
               for path, module in iter_modules(trainable)
               for name, value in module.items() if value is not None}
    save_file(tensors, str(folder / "trained_weights.safetensors"))
    write_json(folder / "method.json", {
        "method": method, "base_model_name_or_path": loaded.source, "task": task,
        "prompt_tokens": prompt_tokens if method == "prompt" else None})
