"""LoRA on mixture-of-experts weights (Qwen3-MoE, Mixtral: transformers' fused 3-D experts)
through their layer rule: per-expert factors added for each routed token by grouped matmuls,
never an [E, in, out] delta; peft's own files for `target_parameters` both ways (alone and with
attention targets, scanned and unscanned), merge into the 3-D experts, and the factors sharded
like the experts."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from causal_lm_checks import state_dict
from peft_checks import TOL, jax_to_peft, max_diff, peft_adapter, peft_logits

import lora_jax
from lora_jax.models import decoder
from lora_jax.models.experts import grouped_delta

IDS = np.random.RandomState(0).randint(0, 99, (2, 10))
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.2, num_experts_per_tok=2)


def tiny(name: str):
    import torch

    torch.manual_seed(0)
    if name == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**TINY, head_dim=8, intermediate_size=48,
                                             moe_intermediate_size=16, num_experts=4,
                                             norm_topk_prob=True)
        return transformers.Qwen3MoeForCausalLM(config).eval()
    config = transformers.MixtralConfig(**TINY, intermediate_size=16, num_local_experts=4)
    return transformers.MixtralForCausalLM(config).eval()


@functools.cache
def loaded(name: str, scan: bool):
    """(module, base params, layouts) of the family's tiny model."""
    hf = tiny(name)
    config = decoder.config_from_hf(hf.config.to_dict())
    model = decoder.build(config, scan_layers=scan)
    return model, decoder.params_from_hf(state_dict(hf), config, scan_layers=scan), \
        lora_jax.layouts(model, IDS)


def test_grouped_delta_ragged_and_gather_equal_each_experts_product():
    rng = np.random.RandomState(0)
    sizes = np.array([3, 0, 5, 1])
    x = rng.randn(sizes.sum(), 6).astype(np.float32)
    a, b = rng.randn(4, 6, 2).astype(np.float32), rng.randn(4, 2, 5).astype(np.float32)
    expert = np.repeat(np.arange(4), sizes)
    want = np.stack([x[m] @ a[e] @ b[e] for m, e in enumerate(expert)])
    for how in ("ragged", "gather"):
        got = grouped_delta(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.asarray(sizes),
                            how)
        np.testing.assert_allclose(got, want, atol=1e-5)


def _products(jaxpr):
    """The operand shapes of every matrix product (dot_general, ragged_dot), nested ones too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "ragged_dot_general", "ragged_dot"):
            found.append(tuple(sorted(tuple(v.aval.shape) for v in eqn.invars
                                      if hasattr(v.aval, "shape") and len(v.aval.shape) > 1)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _products(sub)
    return found


@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.full), True],
                         ids=["unscanned", "scanned"])
def test_expert_factors_add_the_routed_term_without_an_expert_delta(scan):
    """wrap == merge != base; no product of A with B (forward or backward), while the
    materialising fallback (no layouts: no rule) does form it."""
    model, base, layouts = loaded("qwen3_moe", scan)
    config = lora_jax.LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS,
                                 init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the materialising fallback warns
        params = lora_jax.inject(base, config, jax.random.key(0), layouts=layouts)
        apply = lora_jax.wrap(model.apply, config)
        out = apply({"params": params}, IDS)
        loss = lambda p: (apply({"params": p}, IDS) ** 2).mean()
        jaxprs = [jax.make_jaxpr(loss)(params).jaxpr, jax.make_jaxpr(jax.grad(loss))(params).jaxpr]
    merged = model.apply({"params": lora_jax.merge(params, config)}, IDS)
    assert max_diff(out, merged) <= TOL
    assert max_diff(out, model.apply({"params": base}, IDS)) > 100 * TOL
    records = list(lora_jax.core.record.iter_records(params))
    assert {r.record.weight for r in records} == {"gate_up_proj", "down_proj"}
    pairs = {tuple(sorted(tuple(f.shape) for f in r.factors)) for r in records}
    formed = lambda jaxpr: any(p in pairs for p in _products(jaxpr))
    assert not any(formed(j) for j in jaxprs)
    fallback = lora_jax.inject(base, config, jax.random.key(0))  # no layouts: materialised
    with pytest.warns(UserWarning, match="has no layer rule"):
        jaxpr = jax.make_jaxpr(lambda p: lora_jax.wrap(model.apply, config)(
            {"params": p}, IDS))(fallback).jaxpr
    assert formed(jaxpr)
    # Training moves only the factors.
    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = path[-1].key
        assert (float(jnp.abs(g).max()) > 0) == name.endswith(("lora_A", "lora_B")), path


def test_target_modules_do_not_name_the_fused_experts():
    """The fused experts are parameters, not modules: target_modules=["gate_up_proj"] matches
    nothing, in peft (a ValueError) as here."""
    import peft

    _, base, layouts = loaded("qwen3_moe", False)
    with pytest.raises(ValueError, match="matched no module"):
        lora_jax.inject(base, lora_jax.LoraConfig(r=2, target_modules=["gate_up_proj"]),
                        jax.random.key(0), layouts=layouts)
    with pytest.raises(ValueError, match="not found in the base model"):
        peft.get_peft_model(tiny("qwen3_moe"), peft.LoraConfig(r=2,
                                                                target_modules=["gate_up_proj"]))


CASES = [("qwen3_moe", dict(target_parameters=EXPERTS)),
         ("qwen3_moe", dict(target_modules=["q_proj", "v_proj"],
                            target_parameters=["mlp.experts.down_proj"])),
         ("mixtral", dict(target_parameters=EXPERTS)),
         ("mixtral", dict(target_modules=["k_proj"], target_parameters=EXPERTS))]


@pytest.mark.parametrize("name, targets", [
    case if i < 2 else pytest.param(*case, marks=pytest.mark.full)
    for i, case in enumerate(CASES)], ids=[f"{n}-{'+'.join(t)}" for n, t in CASES])
def test_peft_files_both_ways(name, targets, tmp_path):
    """peft's adapter (random factors, its fused lora_A [r*E, in] / lora_B [out, r*E] and the
    base_layer nesting) loads with peft's logits, unscanned and scanned; an adapter trained here
    loads in peft with the same logits, and peft's merge_and_unload equals lora_jax.merge
    (the experts changed)."""
    lora = dict(r=2, lora_alpha=4, **targets)
    peft_model = peft_adapter(tiny(name), str(tmp_path / "peft"), **lora)
    want = peft_logits(peft_model, {"input_ids": IDS})
    for scan in (False, True):
        model, base, layouts = loaded(name, scan)
        params, config = lora_jax.load_peft(tmp_path / "peft", base, model_type=name,
                                            layouts=layouts)
        assert set(config.target_parameters) == set(lora["target_parameters"])
        assert max_diff(lora_jax.wrap(model.apply, config)({"params": params}, IDS), want) <= TOL

    def loss(logits):
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, IDS[:, 1:, None], axis=-1).mean()

    params, logits_diff, merge_diff = jax_to_peft(
        decoder, lambda: tiny(name), lora_jax.LoraConfig(**lora), loss, {"input_ids": IDS},
        str(tmp_path / "ours"), task_type="CAUSAL_LM", scan_layers=True)
    assert logits_diff <= TOL and merge_diff <= 1e-5, (logits_diff, merge_diff)
    merged = lora_jax.merge(params, lora_jax.LoraConfig(**lora))
    experts = merged["model"]["layers"]["mlp"]["experts"]["down_proj"]
    assert max_diff(experts, loaded(name, True)[1]["model"]["layers"]["mlp"]["experts"][
        "down_proj"]) > 1e-4


def test_expert_factors_shard_like_the_experts():
    """Experts sharded over an "expert" mesh axis: each expert's factors on its devices."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    from lora_jax.core.sharding import match_specs, shard_inject

    model, base, layouts = loaded("qwen3_moe", True)
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
    rule = (r".*experts\.(gate_up_proj|down_proj)", P(None, "expert", None, None))
    specs = match_specs(base, [rule])
    config = lora_jax.LoraConfig(r=2, target_parameters=EXPERTS, init_lora_weights=False)
    params = shard_inject(base, config, jax.random.key(0), mesh, specs=specs, layouts=layouts)
    experts = params["model"]["layers"]["mlp"]["experts"]
    for name in ("gate_up_proj", "down_proj"):
        for leaf in (name, f"{name}_lora_A", f"{name}_lora_B"):
            assert experts[leaf].sharding.spec[:2] == (None, "expert"), leaf
            assert experts[leaf].addressable_shards[0].data.shape[1] == 1  # one expert each
    single = lora_jax.inject(base, config, jax.random.key(0), layouts=layouts)
    apply = lora_jax.wrap(model.apply, config)
    assert max_diff(jax.jit(apply)({"params": params}, IDS), apply({"params": single}, IDS)) \
        <= TOL
