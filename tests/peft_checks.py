"""Shared helpers for the peft interop tests: build a peft adapter with random non-zero factors
on a tiny HF model, load it with lora_jax, train/save in JAX and load that with peft, and
compare files."""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import jax
import numpy as np
import optax
import peft
import torch
from safetensors import safe_open

import lora_jax
from lora_jax.peft.files import CONFIG_NAME, WEIGHTS_NAME, load_peft, save_peft

TOL = 1e-4  # float32 logits, max abs diff against peft on PyTorch


def tiny_hf(model_cls: type, config: Any) -> Any:
    """`model_cls(config)` in eval mode, its random weights drawn after `torch.manual_seed(0)`."""
    torch.manual_seed(0)
    return model_cls(config).eval()


def perturb(hf_model: torch.nn.Module, pattern: str) -> torch.nn.Module:
    """Draw the parameters whose name matches the regex `pattern` (norm scales, biases: 1 and 0
    at init) from U(0.5, 1.5), so that parity tests see them; returns the model."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if re.search(pattern, name):
                p.uniform_(0.5, 1.5)
    return hf_model


def state_dict(hf_model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}


def base_params(arch: ModuleType, hf_model: torch.nn.Module, *, scan_layers: bool = False,
                build_kwargs: dict[str, Any] | None = None,
                load_kwargs: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Our model and base params from the HF model's weights (taken before peft wraps it)."""
    config = arch.config_from_hf(hf_model.config.to_dict())
    model = arch.build(config, scan_layers=scan_layers, **(build_kwargs or {}))
    return model, arch.params_from_hf(state_dict(hf_model), config, scan_layers=scan_layers,
                                      **(load_kwargs or {}))


def peft_adapter(hf_model: torch.nn.Module, path: str, *, seed: int = 0,
                 **lora_kwargs: Any) -> peft.PeftModel:
    """`hf_model` wrapped by peft LoRA with random non-zero factors (and biases / saved
    modules perturbed), saved with save_pretrained to `path`. Returns the peft model (eval)."""
    # peft extends list arguments in place (modules_to_save for task models): pass copies.
    model = peft.get_peft_model(hf_model, peft.LoraConfig(**copy.deepcopy(lora_kwargs)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # the factors, trained biases, modules_to_save copies
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    model.eval()
    model.save_pretrained(path)
    return model


def torch_out(model: torch.nn.Module, inputs: dict[str, np.ndarray], field: str = "logits"
              ) -> np.ndarray:
    with torch.no_grad():
        return getattr(model(**{k: torch.tensor(v) for k, v in inputs.items()}),
                       field).numpy()


def peft_logits(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The peft model's logits, large enough that a max abs diff <= TOL means something."""
    logits = torch_out(model, inputs)
    assert np.abs(logits).max() > 0.3, "logits too small for a meaningful comparison"
    return logits


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def read_adapter(path: str) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, Any]]:
    """(tensors as numpy float32/str dtype kept by name, safetensors metadata, config dict)."""
    tensors = {}
    with safe_open(os.path.join(path, WEIGHTS_NAME), "pt") as f:
        metadata = f.metadata()
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    return tensors, metadata, config


def assert_same_files(ours: str, theirs: str) -> None:
    """Key set, shapes, dtypes, metadata and config fields equal (target_modules as a set)."""
    t_ours, m_ours, c_ours = read_adapter(ours)
    t_theirs, m_theirs, c_theirs = read_adapter(theirs)
    assert m_ours == m_theirs == {"format": "pt"}
    assert sorted(t_ours) == sorted(t_theirs)
    for key, value in t_theirs.items():
        assert (t_ours[key].shape, t_ours[key].dtype) == (value.shape, value.dtype), key
    for config in (c_ours, c_theirs):
        if isinstance(config["target_modules"], list):
            config["target_modules"] = sorted(config["target_modules"])
    assert c_ours == c_theirs


def train(params: Any, config: lora_jax.LoraConfig, loss_of_output: Callable[[Any], Any],
          apply: Callable[..., Any], inputs: tuple[Any, ...] | Mapping[str, Any],
          steps: int = 3) -> Any:
    """A few Adam steps on the trainable leaves (lora_jax.optimizer); `inputs` are `apply`'s
    positional (tuple) or keyword (mapping) arguments."""
    tx = lora_jax.optimizer(optax.adam(3e-2), params, config)
    state = tx.init(params)
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else (inputs, {})

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: loss_of_output(apply({"params": p}, *args, **kwargs)))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


def peft_to_jax(arch: ModuleType, model: Any, base: dict[str, Any], peft_model: Any,
                path: str, inputs: dict[str, np.ndarray], **load_kwargs: Any) -> float:
    """Max abs diff between peft's logits and ours with the adapter loaded by load_peft."""
    params, config = load_peft(path, base, **load_kwargs)
    ours = lora_jax.wrap(model.apply, config)({"params": params}, **inputs)
    return max_diff(ours, peft_logits(peft_model, inputs))


def jax_to_peft(arch: ModuleType, hf_model: Callable[[], torch.nn.Module],
                config: lora_jax.LoraConfig, loss_of_output: Callable[[Any], Any],
                inputs: dict[str, np.ndarray], path: str, *, task_type: str | None = None,
                scan_layers: bool = False, build_kwargs: dict[str, Any] | None = None,
                load_kwargs: dict[str, Any] | None = None) -> tuple[Any, float, float]:
    """Train `config`'s adapter in JAX on `hf_model()`'s weights, `save_peft` it to `path` and
    load it with `PeftModel.from_pretrained` onto a fresh `hf_model()` (same seed, same weights).
    Returns (trained params, max abs diff of the logits, max abs diff of peft's
    `merge_and_unload` weights against `lora_jax.merge`)."""
    model, base = base_params(arch, hf_model(), scan_layers=scan_layers,
                              build_kwargs=build_kwargs, load_kwargs=load_kwargs)
    # The decoder module serves several families: its config names the one.
    model_type = getattr(model.config, "model_type", None) or arch.__name__.rpartition(".")[2]
    apply = lora_jax.wrap(model.apply, config)
    shapes = lora_jax.layouts(model, **inputs)
    params = train(lora_jax.inject(base, config, jax.random.key(0), layouts=shapes), config,
                   loss_of_output, apply, inputs)
    b_max = {"/".join(str(k.key) for k in p): float(np.abs(v).max())
             for p, v in jax.tree_util.tree_leaves_with_path(params)
             if p[-1].key.endswith("lora_B") or p[-1].key == "lora_embedding_B"}
    assert b_max and min(b_max.values()) > 0, f"untrained B factors: {b_max}"
    save_peft(path, params, config, model_type=model_type, task_type=task_type)
    pm = peft.PeftModel.from_pretrained(hf_model(), path).eval()
    logits_diff = max_diff(apply({"params": params}, **inputs), peft_logits(pm, inputs))
    merged_ref = arch.params_from_hf(state_dict(pm.merge_and_unload()), model.config,
                                     scan_layers=scan_layers, **(load_kwargs or {}))
    merged = lora_jax.merge(params, config)
    merge_diff = max(jax.tree.leaves(jax.tree.map(max_diff, merged, merged_ref)))
    return params, logits_diff, merge_diff


__all__ = ["TOL", "assert_same_files", "base_params", "jax_to_peft", "load_peft", "max_diff",
           "peft_adapter", "peft_logits", "peft_to_jax", "read_adapter", "save_peft", "state_dict",
           "tiny_hf", "torch_out", "train"]
