"""Mixture-of-experts layers with HF's fused 3-D expert weights, and the LoRA rule for them.

transformers 5 stores a Qwen3-MoE / Mixtral layer's experts as two parameters of one module
`mlp.experts`: `gate_up_proj [E, 2 * inter, hidden]` and `down_proj [E, hidden, inter]` (each
expert `[out, in]`, as torch's Linear). `Experts` keeps them so (same names, shapes and paths) and
runs each routed token through its expert with grouped matmuls on the tokens sorted by expert
(`jax.lax.ragged_dot`): no expert weight is gathered or copied per token.

LoRA on the experts (peft's `target_parameters=["mlp.experts.gate_up_proj", ...]`) gives each
expert its own factors, `A [E, in, r]` and `B [E, r, out]` (the weight's expert axis is a kept
axis, `Layout(order="boi")`). The rule below adds each routed token's low-rank term for its
expert, `(x @ A[e]) @ B[e]`, by the same grouped matmuls ("ragged") or by gathering each token's
expert factors ("gather"; `EXPERT_DELTA` picks, see experiments/moe_benchmark.py): it never forms
an `[E, in, out]` delta.

    >>> import jax, jax.numpy as jnp
    >>> x, sizes = jnp.ones((5, 3)), jnp.array([2, 0, 3])       # 5 rows: 2 for expert 0, 3 for 2
    >>> a, b = jnp.ones((3, 3, 2)), jnp.ones((3, 2, 4))          # A [E, in, r], B [E, r, out]
    >>> grouped_delta(x, a, b, sizes).shape
    (5, 4)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core.factors import Layout
from lora_jax.core.rules import Rule, qualname, register_rule

# Grouped matmul of rows [M, in] with per-expert matrices stored [E, out, in] (torch's order).
_ROWS_BY_OUT_IN = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0])
# How the LoRA term of routed rows is computed: grouped matmuls on the sorted rows ("ragged") or
# each row's expert factors gathered ("gather"); measured in experiments/moe_benchmark.py.
EXPERT_DELTA: Literal["ragged", "gather"] = "ragged"


def grouped_delta(x: jax.Array, a: jax.Array, b: jax.Array, group_sizes: jax.Array,
                  how: Literal["ragged", "gather"] | None = None) -> jax.Array:
    """(x[m] @ A[e]) @ B[e] for each row m of `x [M, in]` sorted by expert, `group_sizes [E]`
    rows per expert, `a [E, in, r]`, `b [E, r, out]`: `[M, out]`."""
    how = how or EXPERT_DELTA
    if how == "ragged":
        return jax.lax.ragged_dot(jax.lax.ragged_dot(x, a, group_sizes), b, group_sizes)
    if how != "gather":
        raise ValueError(f"unknown expert delta {how!r}: use 'ragged' or 'gather'")
    expert = jnp.repeat(jnp.arange(a.shape[0]), group_sizes, total_repeat_length=x.shape[0])
    low = jnp.einsum("mi,mir->mr", x, jnp.take(a, expert, axis=0))
    return jnp.einsum("mr,mro->mo", low, jnp.take(b, expert, axis=0))


class GroupedLinear(nn.Module):
    """Per-expert matrices `[E, out, in]` (param `weight_name`) applied to rows sorted by expert:
    `__call__(x [M, in], group_sizes [E]) -> [M, out]`. Made inside `Experts` with the scope
    shared, so the param sits in `mlp.experts` under its HF name."""

    weight_name: str
    shape: tuple[int, int, int]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        w = self.param(self.weight_name, nn.initializers.normal(0.02), self.shape,
                       self.param_dtype)
        return jax.lax.ragged_dot_general(x.astype(self.dtype), w.astype(self.dtype),
                                          group_sizes, _ROWS_BY_OUT_IN)


register_rule(Rule(
    names=(qualname(GroupedLinear),),
    weight=lambda module: module.weight_name,
    layout=lambda module, weight, args, kwargs: Layout("dense", order="boi"),
    delta=lambda module, x, a, b, args, kwargs: grouped_delta(
        x, a, b, kwargs.get("group_sizes", args[1] if len(args) > 1 else None)),
    parameter=True))


class Experts(nn.Module):
    """HF's `mlp.experts`: `gate_up_proj [E, 2 * inter, hidden]`, `down_proj [E, hidden, inter]`;
    `__call__(x [T, hidden], experts [T, k], weights [T, k]) -> [T, hidden]`, the weighted sum of
    each token's k experts `down(act(gate) * up)`."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    act: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.gate_up = GroupedLinear("gate_up_proj", (e, 2 * i, h), **kw)
        self.down = GroupedLinear("down_proj", (e, h, i), **kw)
        nn.share_scope(self, self.gate_up)
        nn.share_scope(self, self.down)

    def __call__(self, x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
        tokens, k = experts.shape
        flat = experts.reshape(-1)
        order = jnp.argsort(flat)  # the (token, choice) pairs grouped by expert
        sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        rows = jnp.take(x, order // k, axis=0)
        gate, up = jnp.split(self.gate_up(rows, sizes), 2, axis=-1)
        out = self.down(self.act(gate) * up, sizes)
        out = out * jnp.take(weights.reshape(-1), order)[:, None].astype(out.dtype)
        return jnp.zeros((tokens, out.shape[-1]), out.dtype).at[order // k].add(out)


class Router(nn.Module):
    """HF's top-k router (`mlp.gate`, param `weight [E, hidden]`, not a Linear layer): softmax
    over the experts in float32, the k most likely, renormalised to sum 1 if `normalize`
    (Mixtral; Qwen3-MoE's `norm_topk_prob`). Returns (experts [T, k], weights [T, k])."""

    num_experts: int
    k: int
    normalize: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        w = self.param("weight", nn.initializers.normal(0.02), (self.num_experts, x.shape[-1]),
                       self.param_dtype)
        logits = jnp.einsum("th,eh->te", x.astype(self.dtype), w.astype(self.dtype))
        weights, experts = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32)), self.k)
        if self.normalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return experts, weights.astype(self.dtype)


class _FusedExperts(Mapping[str, Any]):
    """A checkpoint's tensors with each layer's per-expert weights (how transformers writes MoE
    files: `<prefix>.experts.<e>.<gate|up|down>.weight`) seen as the fused parameters of the
    PyTorch model (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, router `mlp.gate`),
    each read and fused when asked."""

    def __init__(self, tensors: Mapping[str, Any], files: Mapping[str, str], n: int) -> None:
        self._tensors, self._files, self._n = tensors, files, n
        prefix = re.escape(files["prefix"])
        roles = {files[k]: k for k in ("gate", "up", "down")}
        expert = re.compile(rf"(model\.layers\.\d+)\.{prefix}\.experts\.\d+\.(\w+)\.weight")
        router = re.compile(rf"(model\.layers\.\d+)\.{prefix}\.gate\.weight")
        self._map: dict[str, str | tuple[str, tuple[str, ...]]] = {}
        for name in tensors:
            if (m := expert.fullmatch(name)) and m[2] in roles:
                fused = "down_proj" if roles[m[2]] == "down" else "gate_up_proj"
                self._map[f"{m[1]}.mlp.experts.{fused}"] = (m[1], ("down",) if fused ==
                                                            "down_proj" else ("gate", "up"))
            elif m := router.fullmatch(name):
                self._map[f"{m[1]}.mlp.gate.weight"] = name
            else:
                self._map[name] = name

    def __getitem__(self, name: str) -> Any:
        source = self._map[name]
        if isinstance(source, str):
            return self._tensors[source]
        layer, roles = source
        at = f"{layer}.{self._files['prefix']}.experts"
        return np.stack([np.concatenate([np.asarray(self._tensors[
            f"{at}.{e}.{self._files[role]}.weight"]) for role in roles]) for e in range(self._n)])

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)


def fused_experts(tensors: Mapping[str, Any], files: Mapping[str, str], num_experts: int
                  ) -> Mapping[str, Any]:
    """`tensors` with per-expert weights (if any) fused as transformers 5's model holds them;
    `files` names the block (`prefix`, e.g. Mixtral's `block_sparse_moe`) and the `gate`, `up`,
    `down` weights (e.g. `w1`, `w3`, `w2`). A missing expert is an error naming its tensor."""
    return _FusedExperts(tensors, files, num_experts)
