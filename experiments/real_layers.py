"""lora_jax on projection layers of real packages, through its public API only.

(a) Gemma (the `gemma` package, linen): a tiny random transformer built from gemma's own
    `Embedder` / `Block` / `Attention` / `FeedForward` / `Einsum`, once with multi-head
    attention (num_kv_heads == num_heads: one `qkv_einsum`) and once with grouped-query
    attention (`q_einsum` + `kv_einsum`). The FeedForward's `gating_einsum` and `linear` weights
    sit in one module dict (`nn.share_scope`).
(b) GPT-2 from transformers 4.x (`FlaxGPT2LMHeadModel`, `FlaxConv1D` kernels stored [out, in]):
    a tiny random model from a `GPT2Config`; its trained adapter is written with
    `lora_jax.save_peft` and loaded into PyTorch `GPT2LMHeadModel` (transformers 5) by
    `peft.PeftModel.from_pretrained`.

Per model: `layouts = lora_jax.layouts(module, *inputs)`, `inject(..., layouts=layouts)`,
`wrap(module.apply, config)`, `merge(params, config)`, and checks that

- with `init_lora_weights=True` the wrapped output equals the base output;
- with random factors the wrapped output equals the merged model's (relative max diff <= 1e-5),
  and `merge`'s weights equal W + scale * A B worked out here from each layer's own contraction
  (the reference-merged model is also run against the wrapped one);
- 3 optax adam steps on the trainable half (split -> jax.grad -> update -> combine) change every
  factor and nothing else, and lower the loss;
- (GPT-2) peft on PyTorch gives the wrapped model's logits (max abs diff <= 1e-4), and
  `merge_and_unload` the merged model's.

The packages live in separate environments, each part runs in a subprocess:

    python experiments/real_layers.py --setup   # build the venvs (timed, sizes recorded)
    python experiments/real_layers.py           # run all parts, write results/real_layers.*
    python experiments/real_layers.py --lora-jax-commit HEAD   # lora_jax exactly as committed

gemma 4.x needs Python >= 3.12 and its full dependency set pulls in tensorflow (via kauldron):
`--setup` installs gemma and kauldron with `--no-deps --ignore-requires-python` plus the few
small packages that importing gemma's linen modules needs, into a venv on top of the system
site-packages. The Attention's `kd.nn.Identity()` hook (kauldron.modules, which imports
tensorflow) is replaced by an equivalent parameter-free identity module. transformers 4.x gets a
plain venv (the system has transformers 5) with the system's jax / jaxlib / flax / optax; the
cheaper alternative `--gpt2-env overlay` runs the system python with only transformers 4.x,
tokenizers and huggingface-hub (`pip install --target`) first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
VENVS = Path(os.environ.get("REAL_LAYERS_VENVS", "/work/venvs"))

R, ALPHA, SCALE = 4, 8, 8 / 4
REL_TOL = 1e-5  # wrapped vs merged, float32, relative to the output's max abs value
PEFT_TOL = 1e-4  # lora_jax (JAX) vs peft (PyTorch) logits, max abs diff
STEPS, LR = 3, 1e-2

GEMMA_TARGETS = ["qkv_einsum", "q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum",
                 "linear"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
GPT2_CONFIG = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                   initializer_range=0.2)

# What --setup installs (on top of the system site-packages for gemma; a plain venv for tf4).
GEMMA_PACKAGES = ["gemma==4.0.1", "kauldron==1.4.4", "immutabledict", "einops", "jaxtyping",
                  "typeguard", "lark", "ml_collections"]
OVERLAY_PACKAGES = ["transformers==4.57.6", "tokenizers==0.22.2", "huggingface-hub==0.36.2"]


# --- helpers shared by the JAX parts ------------------------------------------------------------

def _versions(names: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git_rev(commit: str | None = None) -> str:
    """The short hash of `commit`, or of HEAD marked when the checkout's lora_jax differs."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", commit or "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        if commit:
            return rev
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "lora_jax"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+uncommitted lora_jax changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _error(exc: BaseException) -> dict[str, str]:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": "".join(lines[-6:])}


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: array} of a nested dict's array leaves (static records are skipped)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) or hasattr(value, "items"):
            out.update(_leaves(value, path))
        elif hasattr(value, "shape"):
            out[path] = value
    return out


def _set_leaf(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    new = dict(tree)
    new[head] = _set_leaf(tree[head], rest, value) if rest else value
    return new


def _factor_pairs(params: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """{weight path: (weight, A, B leaf paths)} for every LoRA factor pair in `params`."""
    leaves = _leaves(params)
    pairs = {}
    for path in leaves:
        parent, _, name = path.rpartition(".")
        if not name.endswith("lora_A"):
            continue
        weight = name[: -len("lora_A")].rstrip("_") or "kernel"
        if weight == "lora_embedding":
            continue
        wpath = f"{parent}.{weight}"
        bpath = path[: -len("A")] + "B"
        if wpath in leaves and bpath in leaves:
            pairs[wpath] = (wpath, path, bpath)
    return pairs


def _reference_delta(roles: dict[str, Any], a: Any, b: Any) -> tuple[Any, str]:
    """scale * A B laid out as the stored weight, from the layer's own contraction.

    `roles`: the weight's axis letters in storage order (`letters`) and which of them the
    layer contracts with its input (`inputs`) and sends to its output (`outputs`). Leading
    output letters are "kept" (separate factors per index) when A's rank says so.
    """
    import numpy as np

    letters, ins, outs = roles["letters"], roles["inputs"], roles["outputs"]
    n_kept = a.ndim - 1 - len(ins)
    kept = "".join(c for c in letters if c not in ins)[:n_kept]
    rest = "".join(c for c in letters if c in outs and c not in kept)
    in_order = "".join(c for c in letters if c in ins)
    spec = f"{kept}{in_order}r,{kept}r{rest}->{letters}"
    delta = np.einsum(spec, np.asarray(a, np.float64), np.asarray(b, np.float64))
    role_str = "".join("b" if c in kept else "i" if c in ins else "o" for c in letters)
    return SCALE * delta, role_str


def _max_abs(x: Any) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(x, np.float64))))


def _max_diff(x: Any, y: Any) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))


def check_model(name: str, module: Any, base: dict[str, Any], inputs: tuple[Any, ...],
                kwargs: dict[str, Any], targets: list[str], logits_of: Any,
                roles_of: Any, labels: Any) -> dict[str, Any]:
    """The checks of the module docstring for one model; returns the measured numbers.

    `logits_of(output)` picks the logits from the module's output; `roles_of(weight_path)` gives
    the weight's contraction letters (see `_reference_delta`).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import lora_jax

    res: dict[str, Any] = {"model": name, "targets": targets}
    t0 = time.perf_counter()

    def run(fn: Any, variables: Any) -> Any:
        return logits_of(fn(variables, *inputs, **kwargs))

    base_out = run(module.apply, {"params": base})
    res["base_logits_max_abs"] = _max_abs(base_out)
    try:
        layouts = lora_jax.layouts(module, *inputs, **kwargs)
        res["layouts"] = {p: repr(v) for p, v in sorted(layouts.items())}
    except Exception as exc:  # noqa: BLE001 - recorded, the next steps show what still works
        res["layouts"] = _error(exc)
        layouts = None

    # default init: B = 0, the wrapped model is the base model
    try:
        config0 = lora_jax.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets)
        p0 = lora_jax.inject(base, config0, jax.random.key(1), layouts=layouts)
        out0 = run(lora_jax.wrap(module.apply, config0), {"params": p0})
        res["default_init_max_abs_diff"] = _max_diff(out0, base_out)
        res["default_init_ok"] = res["default_init_max_abs_diff"] == 0.0
    except Exception as exc:  # noqa: BLE001
        res["default_init"] = _error(exc)

    config = lora_jax.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                                 init_lora_weights=False)
    try:
        params = lora_jax.inject(base, config, jax.random.key(2), layouts=layouts)
    except Exception as exc:  # noqa: BLE001
        res["inject"] = _error(exc)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        return res
    pairs = _factor_pairs(params)
    leaves = _leaves(params)
    res["adapted"] = {
        w: {"weight": list(leaves[w].shape), "A": [a.rpartition(".")[2], list(leaves[a].shape)],
            "B": [b.rpartition(".")[2], list(leaves[b].shape)]}
        for w, (_, a, b) in sorted(pairs.items())}
    res["n_adapted"] = len(pairs)
    trainable, total = lora_jax.count_parameters(params, config)
    res["trainable_params"], res["total_params"] = int(trainable), int(total)
    apply = jax.jit(lambda p: run(lora_jax.wrap(module.apply, config), {"params": p}))
    plain = jax.jit(lambda p: run(module.apply, {"params": p}))

    def wrapped_vs_merged(p: Any, tag: str) -> None:
        wrapped = apply(p)
        merged_params = lora_jax.merge(p, config)
        merged = plain(merged_params)
        scale = _max_abs(wrapped)
        res[f"{tag}_delta_max_abs"] = _max_diff(wrapped, base_out)  # the adapter does something
        res[f"{tag}_wrapped_vs_merged_rel"] = _max_diff(wrapped, merged) / scale
        # W + scale * A B from each layer's own contraction, against merge's weights
        ref = base
        weight_diff = 0.0
        roles = {}
        leaves_p, leaves_m = _leaves(p), _leaves(merged_params)
        for wpath, (_, apath, bpath) in pairs.items():
            delta, role_str = _reference_delta(roles_of(wpath), leaves_p[apath], leaves_p[bpath])
            roles[wpath] = role_str
            w_ref = np.asarray(leaves_p[wpath], np.float64) + delta
            weight_diff = max(weight_diff, _max_diff(leaves_m[wpath], w_ref))
            ref = _set_leaf(ref, wpath, jnp.asarray(w_ref, jnp.float32))
        res[f"{tag}_merge_vs_reference_weight_max_abs"] = weight_diff
        res[f"{tag}_wrapped_vs_reference_rel"] = _max_diff(wrapped, plain(ref)) / scale
        res[f"{tag}_ok"] = (res[f"{tag}_wrapped_vs_merged_rel"] <= REL_TOL
                            and res[f"{tag}_wrapped_vs_reference_rel"] <= REL_TOL
                            and res[f"{tag}_delta_max_abs"] > 1e-3)
        res["roles"] = roles

    try:
        wrapped_vs_merged(params, "random_factors")
    except Exception as exc:  # noqa: BLE001
        res["random_factors"] = _error(exc)

    # training: split -> grad of the trainable half -> adam update -> combine
    try:
        tx = optax.adam(LR)
        train, frozen = lora_jax.split(params, config)
        opt_state = tx.init(train)
        wrapped = lora_jax.wrap(module.apply, config)

        def loss_fn(tr: Any) -> Any:
            logits = run(wrapped, {"params": lora_jax.combine(tr, frozen)})
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
            return -jnp.mean(jnp.take_along_axis(logp, labels[:, 1:, None], axis=-1))

        @jax.jit
        def step(tr: Any, state: Any) -> Any:
            loss, grads = jax.value_and_grad(loss_fn)(tr)
            updates, state = tx.update(grads, state, tr)
            return optax.apply_updates(tr, updates), state, loss

        losses = []
        for _ in range(STEPS):
            train, opt_state, loss = step(train, opt_state)
            losses.append(float(loss))
        losses.append(float(jax.jit(loss_fn)(train)))
        trained = lora_jax.combine(train, frozen)
        before, after = _leaves(params), _leaves(trained)
        factor_paths = {x for _, a, b in pairs.values() for x in (a, b)}
        changed_factors = sum(not np.array_equal(before[k], after[k]) for k in factor_paths)
        changed_other = [k for k in before if k not in factor_paths
                         and not np.array_equal(before[k], after[k])]
        res["train_losses"] = losses
        res["train_trainable_leaves"] = len(_leaves(train))
        res["train_factors_changed"] = f"{changed_factors}/{len(factor_paths)}"
        res["train_other_leaves_changed"] = changed_other
        res["train_ok"] = (changed_factors == len(factor_paths) and not changed_other
                           and losses[-1] < losses[0])
        wrapped_vs_merged(trained, "trained")
        res["_trained"] = trained
    except Exception as exc:  # noqa: BLE001
        res["train"] = _error(exc)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _tokens(shape: tuple[int, int], vocab: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


# --- part: gemma (run with the gemma venv's python) ---------------------------------------------

def part_gemma(workdir: Path) -> dict[str, Any]:
    import types

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from gemma.gm.nn import _layers, _modules

    class Identity(nn.Module):
        """kauldron's `kd.nn.Identity` (a hook that returns its input; no params)."""

        @nn.compact
        def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            return inputs

    # gemma's Attention builds `kd.nn.Identity()`; kauldron.modules imports tensorflow.
    _modules.kd = types.SimpleNamespace(nn=types.SimpleNamespace(Identity=Identity))

    class TinyGemma(nn.Module):
        """gm.nn.Transformer's text path (embed, blocks `layer_<i>`, final norm, tied decode),
        built from gemma's own modules with a tiny hand-made config."""

        num_kv_heads: int
        vocab: int = 64
        embed_dim: int = 32
        num_heads: int = 4
        head_dim: int = 8
        hidden_dim: int = 48
        num_layers: int = 2
        transpose_gating_einsum: bool = True  # Gemma 3's '...F,NHF->...NH' (else Gemma 2's)

        def setup(self) -> None:
            self.embedder = _modules.Embedder(vocab_size=self.vocab, embed_dim=self.embed_dim)
            self.blocks = [
                _modules.Block(
                    name=f"layer_{i}", num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                    embed_dim=self.embed_dim, head_dim=self.head_dim,
                    hidden_dim=self.hidden_dim, use_post_attn_norm=True,
                    use_post_ffw_norm=True, attn_type=_modules.AttentionType.GLOBAL,
                    query_pre_attn_scalar=self.head_dim**-0.5,
                    transpose_gating_einsum=self.transpose_gating_einsum)
                for i in range(self.num_layers)]
            self.final_norm = _layers.RMSNorm()

        def __call__(self, tokens: Any) -> Any:
            x = self.embedder.encode(tokens)
            b, t = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
            for block in self.blocks:
                _, x = block(x, positions, None, mask)
            return self.embedder.decode(self.final_norm(x))

    out: dict[str, Any] = {"versions": _versions(
        ["jax", "jaxlib", "flax", "optax", "gemma", "kauldron"]),
        "einsum_class": f"{_layers.Einsum.__module__}.{_layers.Einsum.__qualname__}",
        "models": []}
    tokens = jnp.asarray(_tokens((2, 8), 64, 0))
    variants = ((4, True, "gemma MHA (qkv_einsum), gating NHF"),
                (2, False, "gemma GQA (q_einsum + kv_einsum), gating NFH"))
    for kv, transpose, label in variants:
        module = TinyGemma(num_kv_heads=kv, transpose_gating_einsum=transpose)
        base = module.init(jax.random.key(0), tokens)["params"]
        # each Einsum's call: its weight path, equation and shape (the facts the rule must read)
        calls: dict[str, dict[str, Any]] = {}

        def record(f: Any, args: Any, kwargs: Any, ctx: Any, calls: Any = calls) -> Any:
            m = ctx.module
            if isinstance(m, _layers.Einsum) and ctx.method_name == "__call__":
                path = ".".join((*m.path, m.weight_name))
                calls[path] = {"module_path": ".".join(m.path), "weight_name": m.weight_name,
                               "shape": list(m.shape), "equation": args[0]}
            return f(*args, **kwargs)

        with nn.intercept_methods(record):
            module.apply({"params": base}, tokens)

        def roles_of(wpath: str, calls: Any = calls) -> dict[str, str]:
            eqn = calls[wpath]["equation"].replace(" ", "")
            lhs, rest = eqn.split(",")
            kernel, result = rest.split("->")
            return {"letters": kernel,
                    "inputs": "".join(c for c in kernel if c in lhs and c not in result),
                    "outputs": "".join(c for c in kernel if c in result and c not in lhs)}

        res = check_model(label, module, base, (tokens,), {}, GEMMA_TARGETS, lambda o: o,
                          roles_of, tokens)
        trained = res.pop("_trained", None)
        res["einsum_calls"] = calls
        if trained is not None:
            try:
                res.update(_against_gemma_lora(module, base, trained, res["roles"], tokens))
            except Exception as exc:  # noqa: BLE001
                res["gemma_lora"] = _error(exc)
        out["models"].append(res)
    return out


def _against_gemma_lora(module: Any, base: Any, trained: Any, roles: dict[str, str],
                        tokens: Any) -> dict[str, Any]:
    """lora_jax's wrapped model against gemma's own LoRA (`gm.nn.LoRA`) given the same factors.

    gemma.peft gives an Einsum the factors `a [*in, r]`, `b [r, *out]` with every non-input
    kernel axis an output axis (so q/k/v share `a`) and no scale. lora_jax's factors go in as
    they are where no axis is kept; kept axes (q/k/v, k/v) become a block-diagonal `b` over the
    concatenated `a`s; all ranks are zero-padded to one common rank; `b` carries the scale.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from gemma.gm.nn import _lora

    import lora_jax

    config = lora_jax.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=GEMMA_TARGETS,
                                 init_lora_weights=False)
    leaves = _leaves(trained)
    pairs = _factor_pairs(trained)
    kept_sizes = [leaves[a].shape[0] for w, (_, a, _b) in pairs.items() if roles[w][0] == "b"]
    rank = R * max(kept_sizes, default=1)
    lora_model = _lora.LoRA(rank=rank, model=module, dtype=jnp.float32)
    g_params = jax.tree.map(np.asarray, lora_model.init(jax.random.key(0), tokens)["params"])
    g_params = jax.tree.map(np.zeros_like, g_params)  # every LoRA factor zero but ours
    for path, value in _leaves(base).items():
        g_params = _set_leaf(g_params, path, np.asarray(value))
    filled = []
    for wpath, (_, apath, bpath) in pairs.items():
        a, b = np.asarray(leaves[apath], np.float64), np.asarray(leaves[bpath], np.float64) * SCALE
        parent, _, weight = wpath.rpartition(".")
        # gemma names the adapter `_LoRAEinsum_<weight>` in a shared scope, else `_LoRAEinsum_0`
        # inside the Einsum's own dict
        node = (f"{parent}._LoRAEinsum_0.lora" if weight == "w"
                else f"{parent}._LoRAEinsum_{weight}.lora")
        ga, gb = _leaves(g_params)[f"{node}.a"].copy(), _leaves(g_params)[f"{node}.b"].copy()
        n_kept = roles[wpath].count("b")
        if n_kept == 0:
            ga[..., : a.shape[-1]] = a
            gb[: b.shape[0]] = b
        else:  # a [S, *in, r] -> ga [*in, S*r]; b [S, r, *out] -> gb[s*r:(s+1)*r, s] = b[s]
            assert n_kept == 1, roles[wpath]
            r = a.shape[-1]
            for s in range(a.shape[0]):
                ga[..., s * r:(s + 1) * r] = a[s]
                gb[s * r:(s + 1) * r, s] = b[s]
        g_params = _set_leaf(_set_leaf(g_params, f"{node}.a", ga), f"{node}.b", gb)
        filled.append(node)
    g_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g_params)
    theirs = lora_model.apply({"params": g_params}, tokens)
    ours = lora_jax.wrap(module.apply, config)({"params": trained}, tokens)
    return {"gemma_lora_rank": rank, "gemma_lora_adapters_filled": len(filled),
            "gemma_lora_adapters_total": sum(k.endswith(".lora.a") for k in _leaves(g_params)),
            "gemma_lora_vs_wrapped_rel": _max_diff(theirs, ours) / _max_abs(ours)}


# --- part: gpt2 (run with the transformers 4.x venv's python) -----------------------------------

def _gpt2_torch_state(params: dict[str, Any], n_layer: int) -> dict[str, Any]:
    """FlaxGPT2 base params as PyTorch GPT2LMHeadModel's state dict (Conv1D weights [in, out])."""
    import numpy as np

    t = params["transformer"]
    sd = {"transformer.wte.weight": t["wte"]["embedding"],
          "transformer.wpe.weight": t["wpe"]["embedding"],
          "transformer.ln_f.weight": t["ln_f"]["scale"], "transformer.ln_f.bias": t["ln_f"]["bias"],
          "lm_head.weight": t["wte"]["embedding"]}
    for i in range(n_layer):
        h, pre = t["h"][str(i)], f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[pre + ln + ".weight"], sd[pre + ln + ".bias"] = h[ln]["scale"], h[ln]["bias"]
        for block, layer in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"),
                             ("mlp", "c_proj")):
            node = h[block][layer]
            sd[f"{pre}{block}.{layer}.weight"] = np.asarray(node["kernel"]).T  # to [in, out]
            sd[f"{pre}{block}.{layer}.bias"] = node["bias"]
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in sd.items()}


def part_gpt2(workdir: Path) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import save_file
    from transformers import FlaxGPT2LMHeadModel, GPT2Config
    from transformers.models.gpt2 import modeling_flax_gpt2

    import lora_jax

    out: dict[str, Any] = {"versions": _versions(
        ["jax", "jaxlib", "flax", "optax", "transformers", "safetensors"]),
        "conv1d_class": f"{modeling_flax_gpt2.FlaxConv1D.__module__}."
                        f"{modeling_flax_gpt2.FlaxConv1D.__qualname__}"}
    cfg = GPT2Config(**GPT2_CONFIG)
    hf = FlaxGPT2LMHeadModel(cfg, seed=0)
    module, base = hf.module, jax.tree.map(jnp.asarray, hf.params)
    ids = jnp.asarray(_tokens((2, 8), cfg.vocab_size, 0))
    mask = jnp.ones_like(ids)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

    def roles_of(wpath: str) -> dict[str, str]:
        return {"letters": "oi", "inputs": "i", "outputs": "o"}  # y = x @ kernel.T

    res = check_model("GPT-2 (transformers 4.x FlaxGPT2LMHeadModel)", module, base,
                      (ids, mask, pos), {"deterministic": True}, GPT2_TARGETS,
                      lambda o: o.logits, roles_of, ids)
    trained = res.pop("_trained", None)
    out["models"] = [res]
    if trained is None:
        return out
    config = lora_jax.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=GPT2_TARGETS,
                                 init_lora_weights=False)

    def logits(fn: Any, p: Any) -> np.ndarray:
        return np.asarray(fn({"params": p}, ids, mask, pos, deterministic=True).logits)

    try:
        adapter = workdir / "gpt2_adapter"
        lora_jax.save_peft(adapter, trained, config, task_type="CAUSAL_LM", fan_in_fan_out=True,
                           path_map=lambda p: p)  # Flax's "transformer.h.0.attn.c_attn" is torch's
        res["save_peft_files"] = sorted(os.listdir(adapter))
        save_file(_gpt2_torch_state(base, cfg.n_layer), str(workdir / "gpt2_base.safetensors"))
        np.savez(workdir / "gpt2_jax.npz", ids=np.asarray(ids),
                 wrapped=logits(lora_jax.wrap(module.apply, config), trained),
                 merged=logits(module.apply, lora_jax.merge(trained, config)))
        (workdir / "gpt2_config.json").write_text(json.dumps(GPT2_CONFIG))
        res["peft_export"] = "written"
    except Exception as exc:  # noqa: BLE001
        res["peft_export"] = _error(exc)
        return out
    try:  # and back: load_peft onto the base params gives the same model
        layouts = lora_jax.layouts(module, ids, mask, pos, deterministic=True)
        loaded, loaded_config = lora_jax.load_peft(adapter, base, path_map=lambda p: p,
                                                   layouts=layouts)
        res["load_peft_roundtrip_max_abs"] = _max_diff(
            logits(lora_jax.wrap(module.apply, loaded_config), loaded),
            logits(lora_jax.wrap(module.apply, config), trained))
    except Exception as exc:  # noqa: BLE001
        res["load_peft_roundtrip"] = _error(exc)
    return out


# --- part: torch (system python: transformers 5, peft, torch) -----------------------------------

def part_torch(workdir: Path) -> dict[str, Any]:
    import numpy as np
    import peft
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    out: dict[str, Any] = {"versions": _versions(["torch", "transformers", "peft"])}
    if not (workdir / "gpt2_jax.npz").exists():
        out["skipped"] = "the gpt2 part wrote no adapter"
        return out
    cfg = GPT2Config(**json.loads((workdir / "gpt2_config.json").read_text()))
    model = GPT2LMHeadModel(cfg).eval()
    missing, unexpected = model.load_state_dict(load_file(str(workdir / "gpt2_base.safetensors")),
                                                strict=False)
    out["state_dict_missing"], out["state_dict_unexpected"] = list(missing), list(unexpected)
    jx = np.load(workdir / "gpt2_jax.npz")
    ids = torch.tensor(jx["ids"], dtype=torch.long)
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(model, str(workdir / "gpt2_adapter")).eval()
        peft_logits = peft_model(input_ids=ids).logits.numpy()
        merged_logits = peft_model.merge_and_unload()(input_ids=ids).logits.numpy()
    out["peft_logits_max_abs"] = _max_abs(peft_logits)
    out["peft_vs_wrapped_max_abs"] = _max_diff(peft_logits, jx["wrapped"])
    out["merge_and_unload_vs_merged_max_abs"] = _max_diff(merged_logits, jx["merged"])
    out["ok"] = (out["peft_vs_wrapped_max_abs"] <= PEFT_TOL
                 and out["merge_and_unload_vs_merged_max_abs"] <= PEFT_TOL
                 and out["peft_logits_max_abs"] > 0.3)
    return out


PARTS = {"gemma": part_gemma, "gpt2": part_gpt2, "torch": part_torch}


# --- setup: build the venvs, timed ---------------------------------------------------------------

def _timed(cmd: list[str], log: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.append(" ".join(cmd) + "\n" + proc.stdout[-2000:] + proc.stderr[-2000:])
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def setup(venvs: Path) -> dict[str, Any]:
    """Create the gemma and tf4 venvs; download (timed, wheel sizes summed) then install."""
    import shutil
    from importlib.metadata import version

    system = {n: version(n) for n in ("jax", "jaxlib", "flax", "optax")}
    plans = {
        "gemma": dict(system_site=True, no_deps=True, packages=GEMMA_PACKAGES),
        "tf4": dict(system_site=False, no_deps=False,
                    packages=[f"{n}=={v}" for n, v in system.items()]
                    + ["transformers>=4.57,<5", "safetensors"]),
    }
    report: dict[str, Any] = {}
    log: list[str] = []
    for name, plan in plans.items():
        venv, wheels = venvs / name, venvs / f"{name}_wheels"
        shutil.rmtree(venv, ignore_errors=True)
        shutil.rmtree(wheels, ignore_errors=True)
        cmd = [sys.executable, "-m", "venv", str(venv)]
        _timed(cmd + (["--system-site-packages"] if plan["system_site"] else []), log)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        flags = ["--no-deps", "--ignore-requires-python"] if plan["no_deps"] else []
        t_dl = _timed(pip + ["download", "-q", "-d", str(wheels), *flags, *plan["packages"]],
                      log)
        t_in = _timed(pip + ["install", "-q", "--no-index", "--find-links", str(wheels), *flags,
                             *plan["packages"]], log)
        files = sorted(wheels.iterdir())
        report[name] = {
            "packages": plan["packages"], "system_site_packages": plan["system_site"],
            "wheels": len(files), "download_mb": round(sum(f.stat().st_size for f in files)
                                                       / 1e6, 1),
            "largest_wheels": [f"{f.name} ({f.stat().st_size / 1e6:.1f} MB)" for f in
                               sorted(files, key=lambda f: -f.stat().st_size)[:5]],
            "download_s": round(t_dl, 1), "install_s": round(t_in, 1),
            "venv_mb": round(_dir_mb(venv), 1)}
        shutil.rmtree(wheels, ignore_errors=True)
    # the cheap alternative to the tf4 venv: transformers 4.x and the two packages whose
    # versions it pins below the system's, in a --target dir put first on the system's path
    target, wheels = venvs / "tf4_overlay", venvs / "tf4_overlay_wheels"
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(wheels, ignore_errors=True)
    pip = [sys.executable, "-m", "pip"]
    t_dl = _timed(pip + ["download", "-q", "--no-deps", "-d", str(wheels), *OVERLAY_PACKAGES],
                  log)
    t_in = _timed(pip + ["install", "-q", "--no-deps", "--no-index", "--find-links",
                         str(wheels), "--target", str(target), *OVERLAY_PACKAGES], log)
    files = sorted(wheels.iterdir())
    report["tf4_overlay"] = {
        "packages": OVERLAY_PACKAGES, "system_site_packages": True, "wheels": len(files),
        "download_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
        "largest_wheels": [f"{f.name} ({f.stat().st_size / 1e6:.1f} MB)" for f in files],
        "download_s": round(t_dl, 1), "install_s": round(t_in, 1),
        "venv_mb": round(_dir_mb(target), 1)}
    shutil.rmtree(wheels, ignore_errors=True)
    (venvs / "setup_log.txt").write_text("\n\n".join(log))
    return report


# --- driver --------------------------------------------------------------------------------------

def _run_part(part: str, python: Path, workdir: Path, extra_env: dict[str, str]) -> dict[str, Any]:
    if not python.exists():
        return {"skipped": f"{python} does not exist (run with --setup first)"}
    env = {**os.environ, **extra_env, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), __file__, "--part", part, "--workdir", str(workdir)],
                          capture_output=True, text=True, env=env, cwd=str(workdir))
    result_file = workdir / f"{part}.json"
    if proc.returncode or not result_file.exists():
        return {"error": f"the {part} part exited {proc.returncode}",
                "stderr": proc.stderr[-4000:]}
    result = json.loads(result_file.read_text())
    result["part_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.2e}"
    if isinstance(x, dict) and "error" in x:
        return "ERROR"
    return "-" if x is None else str(x)


def _rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for part in ("gemma", "gpt2"):
        for m in results.get(part, {}).get("models", []):
            losses = m.get("train_losses")
            rows.append([
                m["model"], _fmt(m.get("n_adapted", m.get("inject"))),
                _fmt(m.get("default_init_max_abs_diff", m.get("default_init"))),
                _fmt(m.get("random_factors_wrapped_vs_merged_rel", m.get("random_factors"))),
                _fmt(m.get("random_factors_wrapped_vs_reference_rel")),
                _fmt(m.get("random_factors_merge_vs_reference_weight_max_abs")),
                f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else _fmt(m.get("train")),
                _fmt(m.get("train_factors_changed")),
                _fmt(len(m["train_other_leaves_changed"]) if "train_other_leaves_changed" in m
                     else None),
                _fmt(m.get("trained_wrapped_vs_merged_rel")),
                _fmt(m.get("gemma_lora_vs_wrapped_rel", m.get("gemma_lora")))])
    return rows


HEADER = ["model", "adapted weights", "default init |wrapped-base|", "wrapped vs merged (rel)",
          "wrapped vs W+sAB (rel)", "merge vs W+sAB (abs)", "loss (3 adam steps)",
          "factors changed", "other leaves changed", "trained: wrapped vs merged (rel)",
          "trained: wrapped vs gm.nn.LoRA (rel)"]


def _markdown(results: dict[str, Any]) -> str:
    lines = ["# lora_jax on real packages' projection layers", "",
             "Written by `experiments/real_layers.py`. lora_jax commit: "
             f"`{results['lora_jax_commit']}`. r={R}, lora_alpha={ALPHA} (scale {SCALE}), "
             f"float32, CPU.", ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(results)]
    torch_part = results.get("torch", {})
    lines += ["", "## GPT-2 adapter in peft (PyTorch)", ""]
    if "peft_vs_wrapped_max_abs" in torch_part:
        lines += [f"- `save_peft` -> `PeftModel.from_pretrained(GPT2LMHeadModel)`: max |peft - "
                  f"wrapped| = {torch_part['peft_vs_wrapped_max_abs']:.2e} (logits max "
                  f"{torch_part['peft_logits_max_abs']:.2f}; tolerance {PEFT_TOL})",
                  f"- `merge_and_unload` vs `lora_jax.merge`: max abs diff "
                  f"{torch_part['merge_and_unload_vs_merged_max_abs']:.2e}",
                  f"- ok: {torch_part['ok']}"]
    else:
        lines += ["- not run: " + json.dumps({k: v for k, v in torch_part.items()
                                               if k != "versions"})[:2000]]
    gpt2 = (results.get("gpt2", {}).get("models") or [{}])[0]
    if "load_peft_roundtrip_max_abs" in gpt2:
        lines += [f"- `load_peft` of that adapter back onto the Flax base: max abs diff "
                  f"{gpt2['load_peft_roundtrip_max_abs']:.2e}"]
    elif "load_peft_roundtrip" in gpt2:
        lines += ["- `load_peft` of that adapter back onto the Flax base (with `layouts=`) "
                  f"**failed**: `{gpt2['load_peft_roundtrip']['error'][:600]}`"]
    stacked = sorted({(w.split(".")[-2] if w.endswith(".w") else w.split(".")[-1], r)
                      for m in results.get("gemma", {}).get("models", [])
                      for w, r in m.get("roles", {}).items()
                      if w.endswith(("qkv_einsum.w", "kv_einsum.w", "gating_einsum"))})
    if stacked:
        lines += ["", "Gemma's stacked projections (q/k/v, k/v, gate/up on the kernel's first "
                  "axis): " + ", ".join(f"`{n}` roles `{r}`" for n, r in stacked)
                  + ". A leading `b` gives each projection its own A and B (as peft on separate "
                  "q/k/v or gate/up Linears); an `o` there shares one A across them (as peft on "
                  "a fused Linear such as GPT-2's c_attn, and as gemma.peft does for all of "
                  "them)."]
    lines += ["", "## Adapted weights (shapes as stored; roles: b kept, i input, o output)", ""]
    for part in ("gemma", "gpt2"):
        for m in results.get(part, {}).get("models", []):
            lines += [f"### {m['model']}", ""]
            for key in ("layouts", "inject", "default_init", "random_factors", "train",
                        "peft_export", "load_peft_roundtrip", "gemma_lora"):
                if isinstance(m.get(key), dict) and "error" in m[key]:
                    lines += [f"- **{key} failed**: `{m[key]['error'][:800]}`"]
            for w, info in m.get("adapted", {}).items():
                eq = m.get("einsum_calls", {}).get(w, {}).get("equation")
                lines += [f"- `{w}` {info['weight']}"
                          + (f" `{eq}`" if eq else "")
                          + f" roles `{m.get('roles', {}).get(w, '?')}`: "
                          f"`{info['A'][0]}` {info['A'][1]}, `{info['B'][0]}` {info['B'][1]}"]
            if "gemma_lora_vs_wrapped_rel" in m:
                lines += [f"- gemma's own LoRA (`gm.nn.LoRA`, rank {m['gemma_lora_rank']}, "
                          f"{m['gemma_lora_adapters_filled']}/{m['gemma_lora_adapters_total']} "
                          "adapters given lora_jax's trained factors) vs lora_jax wrapped: "
                          f"relative max diff {m['gemma_lora_vs_wrapped_rel']:.2e}"]
            if "trainable_params" in m:
                lines += [f"- trainable {m['trainable_params']} of {m['total_params']} params; "
                          f"{m['seconds']} s"]
            lines += [""]
    if "install" in results:
        lines += ["## Install cost (`--setup`)", "",
                  "Download then install, timed separately, on this 2-core machine; the large "
                  "tf4 wheels (jaxlib, scipy, numpy, tensorstore) came from its local wheel "
                  "store. venv MB: the venv's (or overlay dir's) size on disk.", "",
                  "| venv | wheels | download MB | download s | install s | venv MB |",
                  "|---|---|---|---|---|---|"]
        for name, s in results["install"].items():
            lines += [f"| {name} | {s['wheels']} | {s['download_mb']} | {s['download_s']} | "
                      f"{s['install_s']} | {s['venv_mb']} |"]
        lines += [""]
    lines += ["## Environments", "",
              "- gemma: a venv with the system site-packages (jax, flax, optax, lora_jax's deps) "
              "plus gemma 4.0.1 and kauldron 1.4.4 installed `--no-deps --ignore-requires-python` "
              "(both declare Python >= 3.12; their linen modules import and run on 3.11) and "
              f"{', '.join(GEMMA_PACKAGES[2:])}. The full `gm.nn.Transformer` / `gm.nn.Gemma3_*` "
              "import chain needs tensorflow (kauldron.typing) and `dialog` (Python 3.12 syntax), "
              "so the tiny model is assembled from gemma's `Embedder` / `Block` / `RMSNorm` as "
              "`Transformer` does; Attention's `kd.nn.Identity()` hook is replaced by a "
              "parameter-free identity module.",
              "- GPT-2: transformers 4.57.6 (the last line with Flax models), either a plain venv "
              "with the system's jax/jaxlib/flax/optax or (`--gpt2-env overlay`) the system "
              "python with transformers 4.57.6, tokenizers 0.22.2 and huggingface-hub 0.36.2 "
              "first on PYTHONPATH. The PyTorch side runs on the system python (transformers 5, "
              "peft).", ""]
    lines += ["## Versions", ""]
    for part in ("gemma", "gpt2", "torch"):
        if "versions" in results.get(part, {}):
            lines += [f"- {part}: " + ", ".join(f"{k} {v}" for k, v in
                                               results[part]["versions"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--setup", action="store_true", help="(re)build the venvs, timed")
    ap.add_argument("--venvs", type=Path, default=VENVS, help="where the venvs live")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--lora-jax-commit", help="test lora_jax as of this commit (default: the "
                    "checkout's lora_jax, marked if it has uncommitted changes)")
    ap.add_argument("--gpt2-env", choices=["auto", "venv", "overlay"], default="auto",
                    help="run the GPT-2 part in the tf4 venv or on the system python with the "
                         "tf4_overlay dir first on PYTHONPATH (auto: the venv if it exists)")
    args = ap.parse_args()
    if args.part:
        result = PARTS[args.part](args.workdir)
        (args.workdir / f"{args.part}.json").write_text(json.dumps(result, indent=1, default=str))
        return

    if args.lora_jax_commit:  # resolve once: HEAD may move while this runs
        args.lora_jax_commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", args.lora_jax_commit], capture_output=True,
            text=True, check=True).stdout.strip()
    results: dict[str, Any] = {"lora_jax_commit": _git_rev(args.lora_jax_commit)}
    if args.setup:
        results["install"] = setup(args.venvs)
    elif (args.out_dir / "real_layers.json").exists():  # keep the last measured install cost
        old = json.loads((args.out_dir / "real_layers.json").read_text())
        if "install" in old:
            results["install"] = old["install"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # the lora_jax under test: this checkout's, or that of --lora-jax-commit
        env = {"PYTHONPATH": str(REPO)}
        if args.lora_jax_commit:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.lora_jax_commit,
                                      "lora_jax"], capture_output=True, check=True).stdout
            (workdir / "src").mkdir()
            subprocess.run(["tar", "-x", "-C", str(workdir / "src")], input=archive, check=True)
            env = {"PYTHONPATH": str(workdir / "src")}
        results["gemma"] = _run_part("gemma", args.venvs / "gemma" / "bin" / "python", workdir,
                                     env)
        tf4 = args.venvs / "tf4" / "bin" / "python"
        if args.gpt2_env == "overlay" or (args.gpt2_env == "auto" and not tf4.exists()):
            tf4 = Path(sys.executable)
            env_gpt2 = {"PYTHONPATH": f"{args.venvs / 'tf4_overlay'}:{env['PYTHONPATH']}"}
        else:
            env_gpt2 = env
        results["gpt2_env"] = f"{tf4} PYTHONPATH={env_gpt2['PYTHONPATH']}"
        results["gpt2"] = _run_part("gpt2", tf4, workdir, env_gpt2)
        results["torch"] = _run_part("torch", Path(sys.executable), workdir, env)
    rows = _rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(HEADER)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    for part in ("gemma", "gpt2", "torch"):
        if "error" in results[part] or "skipped" in results[part]:
            print(f"{part}: {results[part].get('error') or results[part].get('skipped')}")
            print(results[part].get("stderr", ""))
    print(json.dumps({k: v for k, v in results["torch"].items() if k != "versions"}))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "real_layers.json").write_text(json.dumps(results, indent=1, default=str)
                                                   + "\n")
    (args.out_dir / "real_layers.md").write_text(_markdown(results))
    print(f"wrote {args.out_dir / 'real_layers.json'} and .md")


if __name__ == "__main__":
    main()
