"""lora_jax.weighted_adapter against peft's `add_weighted_adapter` on the same adapters.

Adapters with random non-zero factors are made by peft (tiny GPT-2 / Llama), loaded into one
peft model and, with `load_peft`, into lora_jax; both combine them with the same weights and
type. Compared: the combined factors (linear / cat: A and B themselves; SVD types: B A, whose
factors are defined up to signs), each saved as peft's files (ours with `save_peft`), and the
logits of the model with the combined adapter, in float32 at 1e-4. peft 0.21's combined rsLoRA
adapter is scaled by sqrt(r) (peft issue #3761, fixed upstream): that peft model is compared
with its scaling set to 1, as the fix does.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from parity_harness import IDS, gpt2_hf, llama_hf
from peft_checks import TOL, base_params, max_diff, peft_adapter, peft_logits

import lora_jax
from lora_jax.core.factors import Layout
from lora_jax.core.record import LoraRecord
from lora_jax.models import gpt2, llama
from lora_jax.multi.weighted import weighted_adapter

ARCHS = {"gpt2": (gpt2, gpt2_hf), "llama": (llama, llama_hf)}
# name: LoraConfig fields of each test adapter (random factors drawn by peft_adapter).
ADAPTERS = {
    "gpt2": {
        "a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj"]),
        "b": dict(r=4, lora_alpha=16, target_modules=["c_attn"]),  # no attn.c_proj
        "c": dict(r=8, lora_alpha=4, target_modules=["c_attn", "wte"]),  # an embedding
        "d": dict(r=2, lora_alpha=4, target_modules=["c_attn"], layers_to_transform=[1]),
    },
    "llama": {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
        "b": dict(r=4, lora_alpha=16, target_modules=["q_proj"], use_rslora=True),
        "c": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    },
}


class Setup:
    """peft adapter folders of one architecture, one peft model holding them all, lora_jax
    params of each (unscanned and scanned) and compiled forwards."""

    def __init__(self, arch: str, root: str) -> None:
        self.arch = arch
        self.module, self.hf = ARCHS[arch]
        self.paths = {}
        for seed, (name, fields) in enumerate(ADAPTERS[arch].items()):
            self.paths[name] = os.path.join(root, name)
            peft_adapter(self.hf(), self.paths[name], seed=seed, **fields)
        names = list(self.paths)
        self.peft = peft.PeftModel.from_pretrained(self.hf(), self.paths[names[0]],
                                                   adapter_name=names[0]).eval()
        for name in names[1:]:
            self.peft.load_adapter(self.paths[name], adapter_name=name)
        self.ours = {}
        for scan in (False, True):
            model, base = base_params(self.module, self.hf(), scan_layers=scan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = {n: lora_jax.load_peft(p, base, model_type=arch)[0]
                          for n, p in self.paths.items()}
            self.ours[scan] = model, loaded
        self.count = 0

    def peft_combine(self, names: list[str], weights: list[float], kind: str, **kw) -> str:
        self.count += 1
        new = f"combined{self.count}"
        self.peft.add_weighted_adapter(names, weights, new, combination_type=kind, **kw)
        if self.peft.peft_config[new].use_rslora:  # peft #3761: undo the sqrt(r) scaling
            for module in self.peft.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer) and new in module.scaling:
                    module.scaling[new] = 1.0
        return new

    def peft_state(self, name: str) -> dict[str, np.ndarray]:
        state = peft.get_peft_model_state_dict(self.peft, adapter_name=name)
        return {k: v.detach().numpy() for k, v in state.items()}

    def peft_model_logits(self, name: str) -> np.ndarray:
        self.peft.set_adapter(name)
        return peft_logits(self.peft, {"input_ids": IDS})

    def our_logits(self, params, config, scan: bool) -> np.ndarray:
        model = self.ours[scan][0]
        return np.asarray(jax.jit(lora_jax.wrap(model.apply, config))({"params": params}, IDS))


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    cache = {}

    def get(arch: str) -> Setup:
        if arch not in cache:
            cache[arch] = Setup(arch, str(tmp_path_factory.mktemp(arch)))
        return cache[arch]

    return get


def _saved(params, config, arch: str, path) -> dict[str, np.ndarray]:
    """Our combined adapter as peft's file tensors (keys without the adapter name)."""
    from safetensors.numpy import load_file

    lora_jax.save_peft(path, params, config, model_type=arch)
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _products(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """B A per module (PyTorch layout) from peft's factor tensors."""
    out = {}
    for key, a in state.items():
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"),
                                   (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_suffix):
                out[key[: -len(a_suffix)]] = state[key[: -len(a_suffix)] + b_suffix] @ a
    return out


def _check(setup: Setup, names, weights, kind, tmp_path, *, scan=False, factors=False,
           logits=True, **kw) -> dict[str, float]:
    """Combine in both and compare the factors (or B A) as saved by peft and by save_peft;
    `logits`: also the logits of the combined adapter, and of ours loaded by peft."""
    model, loaded = setup.ours[scan]
    params, config = weighted_adapter([loaded[n] for n in names], weights, kind, **kw)
    new = setup.peft_combine(names, weights, kind, **kw)
    theirs = setup.peft_state(new)
    ours = _saved(params, config, setup.arch, tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    products = [_products(state) for state in (ours, theirs)]
    numbers = {"product": max(max_diff(v, products[1][k]) for k, v in products[0].items())}
    if factors:
        numbers["factors"] = max(max_diff(ours[k], theirs[k]) for k in theirs)
    assert max(numbers.values()) <= TOL, numbers
    if logits:
        expected = setup.peft_model_logits(new)
        numbers["logits"] = max_diff(setup.our_logits(params, config, scan), expected)
        reloaded = peft.PeftModel.from_pretrained(setup.hf(), tmp_path / "ours").eval()
        numbers["saved"] = max_diff(peft_logits(reloaded, {"input_ids": IDS}), expected)
        # SVD types: B A agree to float32 accuracy (ours and peft's both within 2e-6 of a
        # float64 SVD), which this tiny random model amplifies ~10x in the logits.
        assert max(numbers["logits"], numbers["saved"]) <= TOL, numbers
    return numbers


@pytest.mark.parametrize("kind", ["linear", "cat"])
def test_linear_and_cat_equal_pefts(setups, kind, tmp_path):
    # different alphas; "b" does not adapt c_proj; cat: different ranks, an embedding
    names = ["a", "b"] if kind == "linear" else ["a", "b", "c"]
    _check(setups("gpt2"), names, [0.7, -0.4, 1.3][:len(names)], kind, tmp_path, factors=True)


@pytest.mark.parametrize("kw", [{}, dict(svd_rank=4)])
def test_svd_equals_pefts(setups, kw, tmp_path):
    _check(setups("gpt2"), ["a", "b", "c"], [0.6, 0.5, -0.8], "svd", tmp_path,
           logits=not kw, **kw)


@pytest.mark.parametrize("kind,kw", [
    ("ties", dict(density=0.5)), ("ties", dict(density=0.8, majority_sign_method="frequency")),
    ("magnitude_prune", dict(density=0.6)), ("dare_linear", dict(density=1.0)),
    ("dare_ties", dict(density=1.0)), ("ties_svd", dict(density=0.5)),
    ("magnitude_prune_svd", dict(density=0.7)), ("dare_ties_svd", dict(density=1.0))])
def test_pruning_types_equal_pefts(setups, kind, kw, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "density >= 1, no pruning"
        _check(setups("gpt2"), ["a", "b"], [0.8, -0.5], kind, tmp_path,
               factors=not kind.endswith("svd"), logits=kind == "ties", **kw)


@pytest.mark.parametrize("kind", ["cat", "svd", "ties"])
def test_scanned_stacks_equal_pefts(setups, kind, tmp_path):
    # "d" adapts layer 1 of the scanned stack only: cat packs each layer's columns as peft
    names, kw = (["a", "b"], dict(density=0.5)) if kind == "ties" else (["a", "d", "c"], {})
    _check(setups("gpt2"), names, [0.9, -0.6, 0.4][:len(names)], kind, tmp_path, scan=True,
           factors=kind != "svd", logits=kind == "cat", **kw)


@pytest.mark.parametrize("kind", ["linear", "cat"])
def test_rslora_llama_equals_fixed_peft(setups, kind, tmp_path):
    names = ["a", "b"] if kind == "linear" else ["a", "b", "c"]
    _check(setups("llama"), names, [0.5, 1.5, -0.7][:len(names)], kind, tmp_path,
           factors=True, logits=kind == "cat")


def test_one_adapter_with_weight_one_is_that_adapter(setups):
    setup = setups("llama")  # rsLoRA: the result has scale 1, its factors carry the scaling
    _, loaded = setup.ours[False]
    params, config = weighted_adapter([loaded["a"]], [1.0], "svd")
    setup.peft.set_adapter("a")
    expected = peft_logits(setup.peft, {"input_ids": IDS})
    assert max_diff(setup.our_logits(params, config, False), expected) <= TOL


def test_svd_clamp_is_pefts_quantile_clip(setups):
    """The SVD's signs are arbitrary (LAPACK builds and QR paths differ), and peft's clamp
    depends on them, so it is checked on our own SVD: torch.quantile + clamp of our unclamped
    factors, as peft computes it, give our clamped ones."""
    _, loaded = setups("gpt2").ours[False]
    adapters, weights = [loaded["a"], loaded["b"], loaded["c"]], [0.6, 0.5, -0.8]
    plain = weighted_adapter(adapters, weights, "svd", svd_rank=4)[0]
    clamped = weighted_adapter(adapters, weights, "svd", svd_rank=4, svd_clamp=0.9)[0]
    checked = 0
    for (path, a), (_, b), (_, a_clamped), (_, b_clamped) in zip(*(
            [(p, v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
             if p[-1].key.endswith(name)] for tree in (plain, clamped)
            for name in ("_A", "_B")), strict=True):
        u, vh = torch.tensor(np.asarray(b).T), torch.tensor(np.asarray(a).T)
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), 0.9)
        assert max_diff(u.clamp(-hi, hi), np.asarray(b_clamped).T) <= 1e-6, path
        assert max_diff(vh.clamp(-hi, hi), np.asarray(a_clamped).T) <= 1e-6, path
        assert (u.abs() > hi).any()
        checked += 1
    assert checked == 5  # c_attn, attn.c_proj of 2 layers; wte


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_masks(setups, kind):
    """DARE cannot match torch's generator: each element is dropped or rescaled by 1/density
    (dare_ties: averaged with the other adapter's agreeing element, here of weight 0), about
    `density` of them kept; the same key gives the same result."""
    _, loaded = setups("gpt2").ours[False]
    adapters = [loaded["a"], loaded["b"]]
    run = lambda seed: weighted_adapter(adapters, [1.0, 0.0], kind, density=0.4,
                                        key=jax.random.key(seed))[0]
    first, again, other = run(0), run(0), run(1)
    a_of = lambda tree: np.asarray(tree["transformer"]["h_0"]["attn"]["c_attn"]["lora_A"])
    full = a_of(weighted_adapter(adapters, [1.0, 0.0], "linear")[0])
    kept = a_of(first) != 0
    assert 0.3 < kept.mean() < 0.5
    ratio = a_of(first)[kept] / (full[kept] / 0.4)
    allowed = [1.0] if kind == "dare_linear" else [1.0, 0.5]
    assert np.min(np.abs(ratio[:, None] - np.asarray(allowed)), axis=1).max() <= 1e-5
    assert jax.tree.all(jax.tree.map(np.array_equal, first, again))
    assert not np.array_equal(a_of(first), a_of(other))


def test_bad_input(setups):
    _, loaded = setups("gpt2").ours[False]
    a, b, c = loaded["a"], loaded["b"], loaded["c"]
    cases = [
        (([], []), "empty"),
        (([a, b], [1.0]), "2 adapters but 1 weights"),
        (([a, b], [1.0, 1.0], "mean"), "unknown combination_type 'mean'"),
        (([a, c], [1.0, 1.0], "linear"), "adapter 1 has r=8 at 'transformer.h_0.attn.c_attn'"),
        (([a, b], [1.0, 1.0], "ties"), "pass density"),
        (([a, b], [1.0, 1.0], "dare_linear", 0.5), "pass key"),
        (([a, b], [1.0, float("nan")]), r"weights\[1\] is nan; every weight must be a finite"),
        (([a, b], [float("inf"), 1.0], "svd"), r"weights\[0\] is inf; every weight must be"),
        (([a, b], [1.0, 1.0], "ties", float("nan")), "pass density"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            weighted_adapter(*args[:3], density=args[3] if len(args) > 3 else None)
    other_base = jax.tree.map(lambda x: x, a)
    other_base["transformer"]["ln_f"]["scale"] = other_base["transformer"]["ln_f"]["scale"] + 1
    with pytest.raises(ValueError, match=r"weighted_adapter: adapter 1 changes "
                                         r"'transformer.ln_f.scale', which is not a LoRA factor"):
        weighted_adapter([a, other_base], [1.0, 1.0], "cat")
    with pytest.raises(ValueError, match=r"weighted_adapter: adapter 1 is over another model: "
                                         r"its params differ in extra\.kernel"):
        weighted_adapter([a, {**a, "extra": {"kernel": jnp.ones((2, 2))}}], [1.0, 1.0], "cat")
    dora = jax.tree.map(lambda x: x, a)
    h0 = dora["transformer"]["h_0"]["attn"]["c_attn"]
    h0["lora"] = dataclasses.replace(h0["lora"], variant="dora")
    h0["lora_magnitude_vector"] = np.ones(96, np.float32)
    with pytest.raises(ValueError, match="'transformer.h_0.attn.c_attn' of adapter 1: dora does "
                                         "not support weighted"):
        weighted_adapter([a, dora], [1.0, 1.0], "cat")


@pytest.mark.parametrize("kind", ["svd", "ties_svd"])
def test_svd_forms_no_in_by_out_array(kind):
    """`svd` works from the factors: no array of the weight's `in x out` size is made (the
    check can fail: `ties_svd` prunes elements of the delta, which it must form)."""
    fan_in, fan_out = 24, 20
    record = LoraRecord("kernel", Layout("dense"), 3, 2.0)
    kernel = np.zeros((fan_in, fan_out), np.float32)

    def combine(*factors):
        trees = [{"kernel": kernel, "lora_A": a, "lora_B": b, "lora": record}
                 for a, b in zip(factors[::2], factors[1::2], strict=True)]
        return weighted_adapter(trees, [0.5, -0.5], kind, density=0.5)[0]

    def sizes(jaxpr):
        found = {v.aval.size for eqn in jaxpr.eqns for v in eqn.outvars}
        for eqn in jaxpr.eqns:
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                found |= sizes(sub)
        return found

    shapes = [(fan_in, 3), (3, fan_out)] * 2
    made = sizes(jax.make_jaxpr(combine)(*[np.ones(s, np.float32) for s in shapes]).jaxpr)
    assert (fan_in * fan_out in made) == (kind == "ties_svd"), sorted(made)
