"""`merge`: fold the LoRA deltas into the kernels, for inference or export."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.factors import EMBED_FACTORS, FACTOR_LEAVES, KERNEL_FACTORS, kernel_delta
from lora_jax.partition import has_factors
from lora_jax.targets import join_path


def merge(params: Mapping[str, Any], config: LoraConfig, safe: bool = False) -> dict[str, Any]:
    """Plain params for the unmodified model: W + scale * A B, factors removed.

    The delta is added in float32 and the sum cast once to the kernel's dtype (merging in
    bfloat16 drifts). `safe=True` raises if a merged weight holds NaN or inf (checked on the
    host, so not under `jit`). An adapted embedding that the model also uses as a tied output
    head (`Embed.attend`) changes the head too once merged, though not in the wrapped forward
    (peft behaves the same; `wrap` warns when it sees this).

    >>> import jax, jax.numpy as jnp
    >>> params = {"kernel": jnp.zeros((3, 4)), "lora_A": jnp.ones((3, 2)),
    ...           "lora_B": jnp.ones((2, 4))}
    >>> merge(params, LoraConfig(r=2, lora_alpha=4))["kernel"][0, 0]
    Array(4., dtype=float32)
    """
    merged_any = False

    def visit(node: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
        nonlocal merged_any
        out = {k: visit(v, (*keys, k)) if isinstance(v, Mapping) else v
               for k, v in node.items() if k not in FACTOR_LEAVES}
        if not has_factors(node):
            return out
        merged_any = True
        path = join_path(keys)
        is_embed = EMBED_FACTORS[0] in node
        weight_name = "embedding" if is_embed else "kernel"
        a, b = (node[name] for name in (EMBED_FACTORS if is_embed else KERNEL_FACTORS))
        weight = node[weight_name]
        delta = kernel_delta(a, b, tuple(weight.shape)) * config.scaling(path, rank=a.shape[-1])
        merged = (weight.astype(jnp.float32) + delta).astype(weight.dtype)
        if safe and not np.isfinite(np.asarray(merged, np.float32)).all():
            raise ValueError(f"merging {path!r} produced NaN or inf; the adapter is broken")
        out[weight_name] = merged
        return out

    result = visit(params, ())
    if not merged_any:
        raise ValueError("merge: the params hold no LoRA factors (was inject applied?)")
    return result
