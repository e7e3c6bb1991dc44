"""Adapter sets (lora_jax.adapters): a mixed batch equals running each example with its own
adapter (the plain adapter trees, unpadded, are the oracle), for GPT-2 and Llama, scanned and
unscanned, for every strategy; selecting and swapping never recompile; a set saved in peft's
multi-adapter layout loads in peft (logits 1e-4), agrees with peft's own mixed batch
(`adapter_names`), and loads back; bad input raises. float32."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from peft_checks import base_params, max_diff, tiny_hf, torch_out

import lora_jax
from lora_jax.core import forward
from lora_jax.models import generate, gpt2, llama
from lora_jax.multi import adapters

MIXED_TOL = 1e-5  # relative to the logits' scale: the same float32 products, another grouping
PEFT_TOL = 1e-4

IDS = np.random.RandomState(0).randint(0, 99, (4, 6))
SLOTS = ["a", "b", None, "c"]  # one per example; None: the base alone

ARCHS = {
    "gpt2": (gpt2, lambda: tiny_hf(transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4))),
    "llama": (llama, lambda: tiny_hf(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False))),
}
# Different ranks, alphas and targets per adapter (the third adapts modules the others do not).
TARGETS = {
    "gpt2": (["c_attn"], ["c_attn", "c_fc"], ["c_proj"]),
    "llama": (["q_proj", "v_proj"], ["q_proj", "k_proj", "up_proj"], ["o_proj", "down_proj"]),
}


def _configs(arch: str) -> list[lora_jax.LoraConfig]:
    configs = [lora_jax.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                   init_lora_weights=False, use_rslora=rslora)
               for (r, alpha, rslora), targets in zip(
                   [(2, 4, False), (4, 16, False), (3, 5, True)], TARGETS[arch], strict=True)]
    if arch == "llama":  # one layer of one stack with its own rank and alpha
        configs[2] = dataclasses.replace(configs[2],
                                         rank_pattern={"layers.1.self_attn.o_proj": 5},
                                         alpha_pattern={"layers.1.self_attn.o_proj": 7})
    return configs


ALL = [(a, s) for a in ARCHS for s in (False, True)]
TWO = [("gpt2", False), ("llama", True)]  # each test's minimum: both models, both stack kinds


def _id(param: tuple[str, bool]) -> str:
    return f"{param[0]}-{'scan' if param[1] else 'loop'}"


@pytest.fixture(params=ALL, ids=_id)
def case(request):
    return _case(*request.param)


@functools.cache  # one build per model and stack kind, whatever order the tests run in
def _case(arch: str, scan: bool) -> dict:
    module, hf = ARCHS[arch]
    model, base = base_params(module, hf(), scan_layers=scan)
    shapes = lora_jax.layouts(model, jnp.asarray(IDS))
    members = {name: (lora_jax.inject(base, config, jax.random.key(i), layouts=shapes), config)
               for i, (name, config) in enumerate(zip("abc", _configs(arch), strict=True))}
    aset = adapters.adapter_set(members)
    apply = lora_jax.wrap(model.apply, members["a"][1])
    # The oracle: each example through its own plain (unpadded) adapter, or the bare base.
    expected = []
    for n, name in enumerate(SLOTS):
        x = jnp.asarray(IDS[n:n + 1])
        if name is None:
            expected.append(model.apply({"params": base}, x)[0])
        else:
            params, config = members[name]
            expected.append(lora_jax.wrap(model.apply, config)({"params": params}, x)[0])
    return dict(arch=arch, model=model, base=base, members=members, aset=aset, apply=apply,
                expected=jnp.stack(expected))


def _rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("strategy", forward.STRATEGIES)
@pytest.mark.parametrize("case", ALL, ids=_id, indirect=True)
def test_mixed_batch_equals_each_example_alone(case, strategy):
    apply = lora_jax.wrap(case["model"].apply, case["members"]["a"][1], strategy=strategy)
    aset = case["aset"]
    mixed = jax.jit(apply)({"params": aset.params}, jnp.asarray(IDS),
                           adapter_ids=aset.ids(SLOTS))
    assert _rel(mixed, case["expected"]) <= MIXED_TOL
    # The adapters differ, so the check can tell them apart.
    assert _rel(case["expected"][0], case["expected"][1]) > 1e-2


@pytest.mark.parametrize("case", TWO, ids=_id, indirect=True)
def test_select_equals_the_plain_adapter_and_disable_the_base(case):
    aset, apply, x = case["aset"], case["apply"], jnp.asarray(IDS)
    for name in "abc":
        params, config = case["members"][name]
        plain = lora_jax.wrap(case["model"].apply, config)({"params": params}, x)
        chosen = apply({"params": adapters.select(aset.params, aset.index(name))}, x)
        assert _rel(chosen, plain) <= MIXED_TOL
    off = apply({"params": adapters.select(aset.params, -1)}, x)
    np.testing.assert_array_equal(off, case["model"].apply({"params": case["base"]}, x))


@pytest.mark.parametrize("case", TWO, ids=_id, indirect=True)
def test_swaps_never_recompile(case):
    aset, x = case["aset"], jnp.asarray(IDS)

    @jax.jit
    def forward(params, slot):
        return case["apply"]({"params": adapters.select(params, slot)}, x)

    outs = [forward(aset.params, k) for k in (0, 1, 2, -1)]
    mixed = jax.jit(case["apply"])
    mixed({"params": aset.params}, x, adapter_ids=aset.ids(SLOTS))
    mixed({"params": aset.params}, x, adapter_ids=aset.ids(["c", None, "a", "a"]))
    # Swap in another adapter of the same targets and ranks: only values change.
    config = case["members"]["a"][1]
    other = lora_jax.inject(case["base"], config, jax.random.key(7),
                            layouts=lora_jax.layouts(case["model"], x))
    swapped = adapters.replace(aset, "a", other, config)
    new = forward(swapped.params, 0)
    mixed({"params": swapped.params}, x, adapter_ids=aset.ids(SLOTS))
    assert forward._cache_size() == 1 and mixed._cache_size() == 1
    assert _rel(new, outs[0]) > 1e-3  # the swap took effect
    plain = lora_jax.wrap(case["model"].apply, config)({"params": other}, x)
    assert _rel(new, plain) <= MIXED_TOL


@pytest.mark.parametrize("case", TWO, ids=_id, indirect=True)
def test_adapter_round_trips_and_add_remove(case):
    aset = case["aset"]
    for name, (params, _) in case["members"].items():
        back, _ = adapters.adapter(aset, name)
        assert jax.tree.structure(back) == jax.tree.structure(params)
        for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(got, want)
    smaller = adapters.remove(aset, "b")
    assert smaller.names == ("a", "c")
    again = adapters.add(smaller, "b", *case["members"]["b"])
    assert again.names == ("a", "c", "b")
    x = jnp.asarray(IDS)
    got = case["apply"]({"params": again.params}, x, adapter_ids=again.ids(SLOTS))
    assert _rel(got, case["expected"]) <= MIXED_TOL


@pytest.mark.parametrize("case", [("gpt2", False)], ids=_id, indirect=True)
def test_generate_with_one_adapter_per_prompt(case):
    # Each prompt alone through its selected adapter (select == the plain adapter: above).
    aset, model = case["aset"], case["model"]
    prompts = jnp.asarray(IDS[:, :4])
    mixed = generate.generate(case["apply"], aset.params, model, prompts, 5,
                              adapter_ids=aset.ids(SLOTS))
    for n, name in enumerate(SLOTS):
        alone = generate.generate(case["apply"], adapters.select(aset.params, aset.index(name)),
                                  model, prompts[n:n + 1], 5)
        np.testing.assert_array_equal(mixed[n], alone[0])
    assert len({tuple(np.asarray(row[4:])) for row in mixed}) > 1  # the adapters differ


@pytest.mark.parametrize("case", [("llama", True)], ids=_id, indirect=True)
def test_set_saved_in_peft_layout_loads_in_peft(case, tmp_path):
    module, hf = ARCHS[case["arch"]]
    named = adapters.adapter_set({"default" if n == "a" else n: v
                                  for n, v in case["members"].items()})
    model_type = case["arch"]
    scan = case["model"].scan_layers
    adapters.save_set(tmp_path, named, model_type=model_type)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "b").is_dir()
    peft_model = peft.PeftModel.from_pretrained(hf(), tmp_path)
    for name in ("b", "c"):
        peft_model.load_adapter(tmp_path / name, adapter_name=name)
    x = {"input_ids": IDS}
    for name in ("default", "b", "c"):
        peft_model.set_adapter(name)
        params, config = adapters.adapter(named, name)
        ours = lora_jax.wrap(case["model"].apply, config)({"params": params}, jnp.asarray(IDS))
        assert max_diff(ours, torch_out(peft_model, x)) <= PEFT_TOL
    # peft's own mixed batch (a loop over sub-batches; "__base__" = no adapter) as the oracle.
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(IDS),
                            adapter_names=["default", "b", "__base__", "c"]).logits.numpy()
    ours = case["apply"]({"params": named.params}, jnp.asarray(IDS),
                         adapter_ids=named.ids(["default", "b", None, "c"]))
    assert max_diff(ours, theirs) <= PEFT_TOL
    shapes = lora_jax.layouts(case["model"], jnp.asarray(IDS)) if scan else None
    loaded = adapters.load_set(tmp_path, case["base"], model_type=model_type, layouts=shapes)
    assert loaded.names == ("default", "b", "c")
    got = case["apply"]({"params": loaded.params}, jnp.asarray(IDS),
                        adapter_ids=loaded.ids(["default", "b", None, "c"]))
    assert _rel(got, case["expected"]) <= MIXED_TOL


@pytest.mark.parametrize("case", [("llama", True)], ids=_id, indirect=True)
def test_bad_input_raises(case):
    aset, apply, x = case["aset"], case["apply"], jnp.asarray(IDS)
    with pytest.raises(ValueError, match="no adapter named 'z'"):
        aset.ids(["a", "z"])
    with pytest.raises(ValueError, match="must be integers"):
        apply({"params": aset.params}, x, adapter_ids=jnp.zeros(4))
    with pytest.raises(ValueError, match="batch 4"):
        apply({"params": aset.params}, x, adapter_ids=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="slots 0..K-1"):
        apply({"params": aset.params}, x, adapter_ids=jnp.asarray([0, 1, -2, 0]))
    with pytest.raises(ValueError, match="holds an adapter set"):
        apply({"params": aset.params}, x)
    with pytest.raises(ValueError, match="merge one adapter"):
        lora_jax.merge(aset.params)
    with pytest.raises(ValueError, match="unknown mixed-batch strategy"):
        lora_jax.wrap(case["model"].apply, case["members"]["a"][1], strategy="loop")
    dora = lora_jax.LoraConfig(r=2, target_modules=TARGETS[case["arch"]][0], use_dora=True)
    shapes = lora_jax.layouts(case["model"], x)
    with pytest.raises(ValueError, match="dora"):
        adapters.adapter_set({"d": (lora_jax.inject(case["base"], dora, jax.random.key(0),
                                                    layouts=shapes), dora),
                              **case["members"]})
    # An adapter that trained a base leaf (Llama's untied head here).
    changed = {**case["members"]["b"][0],
               "lm_head": jax.tree.map(lambda v: v + 1, case["base"]["lm_head"])}
    with pytest.raises(ValueError, match="not a LoRA factor"):
        adapters.adapter_set({"a": case["members"]["a"], "b": (changed, case["members"]["b"][1])})


@pytest.mark.parametrize("case", [("gpt2", True)], ids=_id, indirect=True)
def test_sharded_mixed_batch_equals_single_device(case):
    # 8 simulated CPU devices: the kernels Megatron/fsdp-sharded by gpt2's rules, the factors by
    # lora_specs (adapter axis replicated), the batch over "data".
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from lora_jax.core.sharding import lora_specs, match_specs, named_shardings

    aset, apply = case["aset"], case["apply"]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    kernels = [rule for rule in gpt2.SHARDING_RULES if "kernel" in rule[0]]  # vocab 99: odd
    specs = lora_specs(aset.params, match_specs(case["base"], kernels))
    assert specs["transformer"]["h"]["attn"]["c_attn"]["lora_A"] == P(None, None, "fsdp", None)
    assert specs["transformer"]["h"]["attn"]["c_attn"]["lora_scale"] == P(None, None)
    params = jax.device_put(aset.params, named_shardings(specs, mesh, aset.params))
    ids = jnp.asarray(np.tile(IDS, (2, 1)))
    slots = aset.ids(SLOTS * 2)
    batch = NamedSharding(mesh, P("data"))
    sharded = jax.jit(lambda p, x, i: apply({"params": p}, x, adapter_ids=i))(
        params, jax.device_put(ids, batch), jax.device_put(slots, batch))
    single = apply({"params": aset.params}, ids, adapter_ids=slots)
    assert _rel(sharded, single) <= MIXED_TOL
