"""Checks shared by the causal-LM tests (GPT-2, Llama, BLOOM): parity with HF, KV cache, bad
weights, LoRA parameter counts. Each `check_*` asserts and returns what it measured."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import jax
import numpy as np
import pytest
import torch

import lora_jax

TOL = 1e-4  # float32 logits, max abs diff against HF PyTorch
# (scan_layers, remat_policy); the padded cases run the first two.
VARIANTS = [(False, None), (True, None), (True, "nothing_saveable")]


def state_dict(hf_model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}


def load(arch: ModuleType, hf_model: torch.nn.Module, *, scan_layers: bool = False,
         remat_policy: str | None = None) -> tuple[Any, Any, Any]:
    config = arch.config_from_hf(hf_model.config.to_dict())
    model = arch.build(config, scan_layers=scan_layers, remat_policy=remat_policy)
    return model, arch.params_from_hf(state_dict(hf_model), config, scan_layers=scan_layers), config


def hf_logits(hf_model: torch.nn.Module, ids: np.ndarray, **kwargs: Any) -> np.ndarray:
    with torch.no_grad():
        tensors = {k: torch.tensor(np.asarray(v)) for k, v in kwargs.items()}
        return hf_model(torch.tensor(ids), **tensors).logits.float().numpy()


def check_parity(arch: ModuleType, hf_model: torch.nn.Module, ids: np.ndarray,
                 valid: np.ndarray | None = None, variants: int = len(VARIANTS),
                 **kwargs: Any) -> dict[str, float]:
    """Our logits equal HF's (at positions where `valid`, default all) for the first
    `variants` of VARIANTS."""
    ref = hf_logits(hf_model, ids, **kwargs)
    valid = np.ones(ids.shape, bool) if valid is None else valid
    assert np.abs(ref[valid]).max() > 0.5, "logits too small for a meaningful comparison"
    diffs = {}
    for scan, remat in VARIANTS[:variants]:
        model, params, _ = load(arch, hf_model, scan_layers=scan, remat_policy=remat)
        out = np.asarray(model.apply({"params": params}, ids, **kwargs))
        diffs[f"scan={scan},remat={remat}"] = diff = float(np.abs(out - ref)[valid].max())
        assert diff <= TOL, (scan, remat, diff)
    return diffs


def check_padded_parity(arch: ModuleType, hf_model: torch.nn.Module, ids: np.ndarray, *,
                        position_ids: bool = True) -> dict[str, float]:
    """`check_parity` (unscanned and scanned) with left padding in row 0 and right padding in
    row 1, compared at the real tokens; with `position_ids`, HF-style positions from the mask."""
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    mask[1, 7:] = 0
    kwargs = {"position_ids": np.maximum(mask.cumsum(1) - 1, 0)} if position_ids else {}
    return check_parity(arch, hf_model, ids, valid=mask.astype(bool), variants=2,
                        attention_mask=mask, **kwargs)


def check_cache(arch: ModuleType, hf_model: torch.nn.Module, ids: np.ndarray,
                prefill: int, *, scan_layers: bool) -> float:
    """Prefill, then decode token by token: each step's logits equal the full forward's."""
    model, params, _ = load(arch, hf_model, scan_layers=scan_layers)
    variables = {"params": params}
    full = np.asarray(model.apply(variables, ids))
    step = jax.jit(model.apply)
    logits, cache = step(variables, ids[:, :prefill], cache=model.init_cache(len(ids), 16))
    outs = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, cache = step(variables, ids[:, t:t + 1], cache=cache)
        outs.append(logits)
    assert int(cache.index) == ids.shape[1]
    diff = float(np.abs(np.concatenate(outs, axis=1) - full).max())
    assert diff <= TOL, diff
    return diff


def check_bad_weights(arch: ModuleType, hf_model: torch.nn.Module, name: str) -> None:
    """Missing, unexpected and misshaped tensors are errors that name them."""
    sd = state_dict(hf_model)
    config = arch.config_from_hf(hf_model.config.to_dict())
    missing = {k: v for k, v in sd.items() if k != name}
    with pytest.raises(ValueError, match=rf"missing: \['{name}'\]"):
        arch.params_from_hf(missing, config)
    with pytest.raises(ValueError, match=r"unexpected: \['model.extra.weight'\]"):
        arch.params_from_hf({**sd, "model.extra.weight": np.zeros(3)}, config, scan_layers=True)
    bad = {**sd, name: sd[name][..., :-1]}
    with pytest.raises(ValueError, match=rf"wrong shape: \['{name}: got"):
        arch.params_from_hf(bad, config)


def check_lora_counts(arch: ModuleType, hf_model: torch.nn.Module, targets: list[str],
                      ids: np.ndarray) -> tuple[int, int]:
    """`count_parameters` after `inject` (unscanned and scanned) equals peft's counts, and a
    freshly injected adapter leaves the outputs unchanged through `wrap`."""
    import peft

    kwargs = dict(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=targets)
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(**kwargs))
    expected = peft_model.get_nb_trainable_parameters()
    peft_model.unload()  # the tests reuse the HF model unadapted
    config = lora_jax.LoraConfig(**kwargs)
    for scan in (False, True):
        model, params, _ = load(arch, hf_model, scan_layers=scan)
        layouts = lora_jax.layouts(model, ids) if scan else None
        adapted = lora_jax.inject(params, config, jax.random.key(0), layouts=layouts)
        assert lora_jax.count_parameters(adapted, config) == expected
        out = lora_jax.wrap(model.apply, config)({"params": adapted}, ids)
        np.testing.assert_allclose(out, model.apply({"params": params}, ids), atol=1e-6)
    return expected


def check_bfloat16(arch: ModuleType, hf_model: torch.nn.Module, ids: np.ndarray) -> float:
    """bfloat16 compute and params (scanned, remat) run and stay near the float32 logits: within
    5% of their largest value, or as near as transformers' own bfloat16 forward is (x 1.25)."""
    import copy

    import jax.numpy as jnp

    model32, params, config = load(arch, hf_model)
    model = arch.build(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True,
                       remat_policy="dots_saveable")
    scanned = arch.params_from_hf(state_dict(hf_model), config, scan_layers=True)
    out = model.apply({"params": jax.tree.map(lambda a: a.astype(jnp.bfloat16), scanned)}, ids)
    assert out.dtype == jnp.bfloat16
    ref = np.asarray(model32.apply({"params": params}, ids))
    rel = float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())
    theirs = hf_logits(copy.deepcopy(hf_model).to(torch.bfloat16), ids).astype(np.float32)
    hf_rel = float(np.abs(theirs - ref).max() / np.abs(ref).max())
    assert rel < max(0.05, 1.25 * hf_rel), (rel, hf_rel)
    return rel
