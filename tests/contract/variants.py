"""The adapter methods of the contract suite, one row each. A new method adds one `Variant`
to `VARIANTS`: how to build its config, which leaves train, which layer kinds it refuses (and
what the refusal says), and whether it adapts quantized bases and joins adapter sets."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from lora_jax import LoraConfig
from lora_jax.variants.lokr import LoKrConfig
from lora_jax.variants.vera import VeraConfig


@dataclasses.dataclass(frozen=True)
class Variant:
    """One adapter method.

    `config(init, **targets)`: the method's config for the targeting fields (`target_modules`
    or `target_parameters`); `init=True` is its default initialisation (the adapted model is
    the base exactly), `init=False` a random adapter that changes the output.
    `trains`: a regex `re.search`ed on a leaf's name: the leaves one training step moves (every
    other leaf stays bit-equal). `init_rtol`: how far the default init's output may be from
    the base's, relative to its largest magnitude (0: bit-equal). `refused`: layer kind -> a
    regex of the ValueError `inject` raises for it. `quantized`: adapts an NF4 / int8 base.
    `adapter_sets`: joins `lora_jax.adapters` sets (mixed batches). `sharded`: some trained
    leaf follows the weight's sharding (else all are replicated, e.g. LoKr's small factors)."""

    name: str
    config: Callable[..., Any]
    trains: str
    init_rtol: float = 0.0
    refused: Mapping[str, str] = dataclasses.field(default_factory=dict)
    quantized: bool = True
    adapter_sets: bool = False
    sharded: bool = True  # some trained leaf is partitioned where the weight is


def _lora(**fields):
    return lambda init, **targets: LoraConfig(r=2, lora_alpha=4, init_lora_weights=init,
                                              **targets, **fields)


_DORA_KINDS = "DoRA applies to Dense-like, Conv and Embed"  # peft's DoRA layers
_VERA_KINDS = "VeRA adapts Linear layers"  # peft's VeRA: torch Linear and Conv1D
VARIANTS = {v.name: v for v in [
    Variant("lora", _lora(), trains=r"lora_(embedding_)?[AB]$", adapter_sets=True),
    # m / ||W + s A B|| is 1 at init only up to rounding where the forward computes the norm in
    # another compiled program than inject did (a scanned stack).
    Variant("dora", _lora(use_dora=True), trains=r"lora_(embedding_)?[AB]$|magnitude_vector$",
            init_rtol=1e-6, refused={kind: _DORA_KINDS for kind in (
                "einsum", "gemma_qkv", "gemma_gqa", "gemma_mlp", "fallback")}),
    Variant("vera", lambda init, **targets: VeraConfig(r=2, init_weights=init, **targets),
            trains=r"vera_lambda_[bd]$", refused={
                **{kind: _VERA_KINDS for kind in ("conv", "embed", "gemma_qkv", "gemma_gqa")},
                "fallback": "VeraConfig has no field 'target_parameters'"}),
    # r=1 on the 8 x 8 weights (in = out = 2 * 4): w1 [2, 2] full, w2 = w2_a [4, 1] @ w2_b [1, 4].
    Variant("lokr", lambda init, **targets: LoKrConfig(r=1, alpha=2, init_weights=init,
                                                      **targets),
            trains=r"lokr_w[12](_[ab])?$", sharded=False, refused={
                **{kind: "lokr does not support this kind of layer: peft's LoKr adapts Linear"
                   for kind in ("conv", "embed", "einsum", "gemma_qkv", "gemma_gqa",
                                "gemma_mlp")},
                "dense_general": "lokr cannot adapt it: its 2 input axes",
                "maxtext": "lokr cannot adapt it: its 2 input axes",
                "fallback": "LoKrConfig has no field 'target_parameters'"}),
]}
