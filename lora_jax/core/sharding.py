"""Sharding for LoRA: factor specs that follow the base's partitioning, and inject onto a mesh.

A keeps the kernel's input axes' sharding, B its output axes', the rank axis is replicated and a
scanned stack's layer axis kept, so `(x A) @ B` needs the collectives of `x @ W`: kernel
`('fsdp', 'tensor')` -> A `('fsdp', None)`, B `(None, 'tensor')`. The base's partitioning comes
as a spec tree (`match_specs` writes one from regex rules), as `NamedSharding`s on its arrays or
as Flax logical-axis boxes plus axis rules.

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    specs = match_specs(params, [(r".*(c_attn|c_fc)\\.kernel", P(None, "fsdp", "tensor")),
                                 (r".*c_proj\\.kernel", P(None, "tensor", "fsdp"))])
    params = shard_inject(params, config, key, mesh, specs=specs, layouts=lora_layouts)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax import variants
from lora_jax.core.config import LoraConfig
from lora_jax.core.factors import Layout
from lora_jax.core.inject import inject
from lora_jax.core.record import LoraRecord, iter_records, record_name, scale_name, without_adapters
from lora_jax.core.saved import drop_originals, keep_originals, table_of
from lora_jax.core.targets import join_path, with_leaves
from lora_jax.quant.quantize import is_quantized
from lora_jax.variants.inits import changes_base

Rules = Sequence[tuple[str, Any]]


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def base_specs(tree: Any, *, rules: Rules | None = None) -> Any:
    """A tree of `PartitionSpec`s from any accepted form of a base's partitioning: specs (kept),
    arrays or shapes with a `NamedSharding` (its spec), Flax partitioning boxes (their names,
    mapped to mesh axes by `rules`, e.g. `[("embed", "fsdp")]`), else `P()`. A quantized kernel
    is one leaf, its codes' spec; None holes stay None.

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> boxed = nn.Partitioned(jnp.ones((4, 4)), names=("embed", "mlp"))
    >>> base_specs({"kernel": boxed, "bias": jnp.ones(4)}, rules=[("embed", "fsdp")])
    {'bias': P(), 'kernel': P('fsdp', None)}
    """

    def spec(x: Any) -> P:
        if _is_spec(x):
            return x
        if _is_box(x):
            if rules is None:
                return P(*x.names)
            return nn.logical_to_mesh_axes(x.names, rules) or P()  # None: only for names=None
        if is_quantized(x):
            return spec(x.codes)
        sharding = getattr(x, "sharding", None)
        return sharding.spec if isinstance(sharding, NamedSharding) else P()

    return jax.tree.map(spec, tree, is_leaf=lambda x: _is_spec(x) or _is_box(x) or
                        is_quantized(x))


def match_specs(params: Any, rules: Rules, default: P | None = None) -> Any:
    """A spec tree for `params` from `(regex, PartitionSpec)` rules: the first regex that
    `re.fullmatch`es a leaf's dotted path gives its spec, else `default` (None: `P()`).

    >>> import jax.numpy as jnp
    >>> params = {"attn": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
    >>> match_specs(params, [(".*kernel", P("fsdp", None))])
    {'attn': {'bias': P(), 'kernel': P('fsdp', None)}}
    """
    default = P() if default is None else default
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def spec(path: tuple[Any, ...], _: Any) -> P:
        return next((s for regex, s in compiled if regex.fullmatch(join_path(path))), default)

    return jax.tree_util.tree_map_with_path(spec, nn.unbox(params), is_leaf=is_quantized)


def fsdp_specs(params: Any, size: int, axis: str = "fsdp") -> Any:
    """A spec tree sharding every weight of `params` over `size` devices of mesh axis `axis`
    (FSDP), for models without partitioning rules: each leaf of 2+ axes along its largest axis
    that divides by `size` (the first of equals); vectors, leaves with no such axis and quantized
    kernels (their blocks must not straddle devices) are replicated.

    >>> import jax.numpy as jnp
    >>> specs = fsdp_specs({"kernel": jnp.zeros((6, 8)), "bias": jnp.zeros(8)}, 4)
    >>> specs["kernel"], specs["bias"]
    (P(None, 'fsdp'), P())
    """

    def spec(x: Any) -> P:
        shape = () if is_quantized(x) else getattr(x, "shape", ())
        fits = [d for d in range(len(shape)) if shape[d] % size == 0]
        if len(shape) < 2 or not fits:
            return P()
        best = max(fits, key=lambda d: (shape[d], -d))
        return P(*(axis if d == best else None for d in range(len(shape))))

    return jax.tree.map(spec, nn.unbox(params), is_leaf=is_quantized)


def lora_specs(params: Mapping[str, Any], base: Any, *, rules: Rules | None = None) -> Any:
    """`PartitionSpec`s for every leaf of injected `params` (arrays or abstract shapes).

    `base`: the base's partitioning in any form `base_specs` reads, shaped like the base params
    (with or without factors); the factors' specs follow their weight's, and a quantized
    kernel's become its codes' and scales' (`NF4Tensor.specs`).

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> from lora_jax import inject
    >>> model = nn.Dense(6, use_bias=False)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    >>> params = inject(params, LoraConfig(r=2, target_modules=".*"), jax.random.key(1))
    >>> specs = lora_specs(params, {"kernel": P("fsdp", "tensor")})
    >>> specs["lora_A"], specs["lora_B"]
    (P('fsdp', None), P(None, 'tensor'))
    """
    flat_base = {tuple(str(getattr(k, "key", k)) for k in path): spec for path, spec in
                 jax.tree_util.tree_flatten_with_path(base_specs(base, rules=rules),
                                                      is_leaf=_is_spec)[0]}

    def base_spec(keys: tuple[str, ...], leaf: Any, strict: bool) -> P:
        """The base's spec of a leaf, checked against its rank (`strict`: must equal it)."""
        path, spec = ".".join(keys), flat_base.get(keys)
        if spec is None:
            raise ValueError(
                f"the base specs have no entry for {path!r}; give a spec (P() for replicated) "
                "for every leaf of the base params"
            )
        if len(spec) > leaf.ndim or (strict and 0 < len(spec) < leaf.ndim):
            raise ValueError(
                f"the PartitionSpec {spec} for {path!r} has {len(spec)} entries but the weight has "
                f"{leaf.ndim} axes. Give one entry per axis (a scanned stack's leading layer axis "
                "needs its own entry, usually None)"
            )
        return spec

    plain = nn.unbox(params)
    factor_specs: dict[tuple[str, ...], P] = {}
    for item in iter_records(plain):
        keys = tuple(item.path.split(".")) if item.path else ()
        weight = item.weight
        spec = base_spec((*keys, item.record.weight), weight, strict=True) or \
            (None,) * weight.ndim
        roles = item.record.layout.roles(weight.ndim)
        pick = lambda letters, spec=spec, roles=roles: [
            ax for ax, r in zip(spec, roles, strict=True) if r in letters]
        # A set's adapter axis (after the stacked layers' axes) is replicated, as the rank is.
        layers, adapters = pick("s"), [None] if item.record.adapters else []
        stack = [*layers, *adapters, *pick("b")]
        # Each leaf's input / output axes sharded as the weight's, its other axes replicated.
        dims = {"i": pick("i"), "o": pick("o")}
        for leaf in variants.of(item.record).leaves_of(item.record):
            factor_specs[(*keys, leaf.key(item.record.weight))] = P(
                *stack, *(d for c in leaf.axes for d in dims.get(c, [None])))
        if item.record.scale is None:  # the array scale: one per stacked layer (and adapter)
            factor_specs[(*keys, scale_name(item.record.weight))] = P(*layers, *adapters)

    def visit(node: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, Mapping):
                out[key] = visit(value, (*keys, key))
            elif value is None or isinstance(value, LoraRecord):
                out[key] = value
            elif (*keys, key) in factor_specs:
                out[key] = factor_specs[(*keys, key)]
            elif is_quantized(value):
                out[key] = value.specs(base_spec((*keys, key), value, strict=False))
            else:  # a saved table's original takes the table's spec
                out[key] = base_spec((*keys, table_of(key) or key), value, strict=False)
        return out

    return visit(plain, ())


def named_shardings(specs: Any, mesh: Mesh, shapes: Any = None) -> Any:
    """`NamedSharding`s on `mesh` for a spec tree, checked before anything compiles.

    Raises a ValueError naming the leaf when a spec uses an axis the mesh lacks, or (given
    `shapes`, a tree like `specs`) when a sharded dimension does not divide over its axes.

    >>> import jax.numpy as jnp
    >>> mesh = Mesh(jax.devices()[:1], ("fsdp",))
    >>> named_shardings({"kernel": P("fsdp", None)}, mesh)["kernel"].spec
    P('fsdp', None)
    >>> named_shardings({"kernel": P("tensor")}, mesh)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: ...tensor...
    """
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]
    shape_of = {} if shapes is None else dict(
        jax.tree_util.tree_flatten_with_path(nn.unbox(shapes))[0])
    for path, spec in flat:
        name = join_path(path)
        for dim, entry in enumerate(spec):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            unknown = [a for a in axes if a not in mesh.shape]
            if unknown:
                raise ValueError(
                    f"the PartitionSpec {spec} for {name!r} uses mesh axis {unknown[0]!r}, which "
                    f"the mesh does not have; its axes are {tuple(mesh.axis_names)}"
                )
            leaf = shape_of.get(path)
            size = math.prod(mesh.shape[a] for a in axes)
            if leaf is not None and dim < len(leaf.shape) and leaf.shape[dim] % size:
                raise ValueError(
                    f"{name!r} has shape {tuple(leaf.shape)}: axis {dim} of size "
                    f"{leaf.shape[dim]} does not divide over mesh axes {axes} ({size} devices)"
                )
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def shard_inject(
    params: Mapping[str, Any],
    config: LoraConfig,
    key: jax.Array,
    mesh: Mesh,
    *,
    specs: Any = None,
    rules: Rules | None = None,
    layouts: Mapping[str, Layout] | None = None,
) -> dict[str, Any]:
    """`inject` onto a mesh: the factors are created on their devices by a jitted initialiser
    with sharded outputs, and the base leaves are placed on their specs (not copied when already
    placed so). The base's partitioning is `specs` (see `base_specs`) or, if None, read from
    `params` (`NamedSharding`s, or logical-axis boxes with `rules`). Unboxed arrays come back:
    `jax.tree.map(lambda a: a.sharding, result)` gives the shardings for `jax.jit`.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> model, x = nn.Dense(4), jnp.ones((1, 4))
    >>> config = lora_jax.LoraConfig(r=2, target_modules=".*")
    >>> mesh = Mesh(jax.devices()[:1], ("fsdp",))  # e.g. every device on one axis
    >>> specs = {"kernel": P("fsdp", None), "bias": P()}
    >>> params = shard_inject(model.init(jax.random.key(0), x)["params"], config,
    ...                       jax.random.key(1), mesh, specs=specs)
    >>> params["kernel"].sharding.spec, params["lora_A"].sharding.spec  # A follows the kernel
    (P('fsdp', None), P('fsdp', None))
    """
    plain = nn.unbox(params)
    abstract = jax.eval_shape(lambda p, k: inject(p, config, k, layouts=layouts), plain, key)
    all_specs = lora_specs(abstract, params if specs is None else specs, rules=rules)
    shardings = named_shardings(all_specs, mesh, abstract)
    placed = jax.tree.map(jax.device_put, plain, drop_originals(without_adapters(shardings)))
    # PiSSA / OLoRA / LoftQ also give the residual base weight.
    residual = changes_base(getattr(config, "init_lora_weights", True))
    arrays = lambda record: (*record.arrays, *((record.weight,) if residual else ()))

    def pick(tree: Any, names: Callable[[LoraRecord], tuple[str, ...]]) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {}  # a module may hold several adapted weights
        for item in iter_records(tree):
            out.setdefault(item.path, {}).update({n: item.module[n] for n in names(item.record)})
        return out

    # From the placed base: DoRA's magnitude and the SVD inits read the weight's values.
    new = jax.jit(lambda base, k: pick(inject(base, config, k, layouts=layouts), arrays),
                  out_shardings=pick(shardings, arrays))(placed, key)
    records = pick(abstract, lambda record: (record_name(record.weight),))
    return keep_originals(with_leaves(with_leaves(placed, new), records), config)


def opt_state_specs(opt_state: Any, trainable_specs: Any) -> Any:
    """Specs for an optimizer state (or `jax.eval_shape(tx.init, params)`): every subtree shaped
    like the trainable tree (Adam's `mu`, `nu`) gets `trainable_specs`, other leaves `P()`.

    >>> import jax.numpy as jnp, optax
    >>> trainable = {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.ones((2, 4))}
    >>> specs = {"lora_A": P("fsdp", None), "lora_B": P()}
    >>> adam = opt_state_specs(optax.adam(1e-3).init(trainable), specs)[0]
    >>> adam.mu == specs, adam.count
    (True, P())
    """
    treedef = jax.tree.structure(trainable_specs, is_leaf=_is_spec)

    def is_params_like(x: Any) -> bool:
        return not isinstance(x, jax.ShapeDtypeStruct | jax.Array) and (
            jax.tree.structure(x) == treedef)  # type: ignore[operator]  # jaxlib: no PyTreeDef stub

    return jax.tree.map(lambda x: trainable_specs if is_params_like(x) else P(), opt_state,
                        is_leaf=is_params_like)
