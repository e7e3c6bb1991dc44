"""One named regression test per class of disagreement with peft found by the differential check
(issue 15). Each runs the minimal config through peft and lora_jax (tests/parity_harness.py:
validity, adapted modules with r and scaling, trainable count, logits, merge, save_peft ->
PeftModel.from_pretrained and peft save_pretrained -> load_peft) and checks the class's point."""

import os
import warnings

import jax
import numpy as np
import peft
import pytest
from parity_harness import ARCHS, compare, quiet
from peft_checks import state_dict, torch_out

import lora_jax
from lora_jax.core.targets import layer_index


def _agree(name, fields, scan, tmp, **kwargs):
    result = compare(name, fields, scan, str(tmp), **kwargs)
    assert not result.disagreements, (name, scan, fields, result.disagreements)
    return result


def test_class_01_layer_index_is_the_first_number_in_the_path(tmp_path):
    # peft reads T5's block index (block.1), not the last number (layer.0).
    assert layer_index("encoder.block_1.layer_0.SelfAttention.q", None) == 1
    assert layer_index("decoder.block_0.layer_1.EncDecAttention.q", None) == 0
    result = _agree("t5", {"r": 4, "target_modules": ["q"], "layers_to_transform": [1]}, False,
                    tmp_path)
    assert set(result.our_targets) == {"encoder.block.1.layer.0.SelfAttention.q",
                                       "decoder.block.1.layer.0.SelfAttention.q",
                                       "decoder.block.1.layer.1.EncDecAttention.q"}


def test_class_02_a_name_ending_in_a_digit_is_a_module_name_not_a_layer(tmp_path):
    fields = {"r": 4, "target_modules": ["wi_0", "decoder.block.1.layer.2.DenseReluDense.wi_1"],
              "rank_pattern": {"encoder.block.0.layer.1.DenseReluDense.wi_0": 2}}
    result = _agree("t5", fields, False, tmp_path)
    assert result.our_targets["encoder.block.0.layer.1.DenseReluDense.wi_0"][0] == 2
    assert result.our_targets["encoder.block.1.layer.1.DenseReluDense.wi_0"][0] == 4
    assert "decoder.block.1.layer.2.DenseReluDense.wi_1" in result.our_targets
    # wi_0 is no layer 0: a layer filter reads the block index.
    result = _agree("t5", {"r": 4, "target_modules": ["wi_0"], "layers_to_transform": [1]},
                    False, tmp_path / "filter")
    assert len(result.our_targets) == 2


@pytest.mark.parametrize("name, saved", [("gpt2", "ln_f"), ("bert", "pooler")])
def test_class_03_modules_to_save_without_a_kernel(tmp_path, name, saved):
    target = {"gpt2": "c_attn", "bert": "query"}[name]
    _agree(name, {"r": 4, "target_modules": [target], "modules_to_save": [saved]}, False,
           tmp_path)


def test_class_04_a_module_in_modules_to_save_is_not_adapted(tmp_path):
    for i, target in enumerate(("all-linear", ["query", "classifier"])):
        result = _agree("bert", {"r": 2, "target_modules": target,
                                 "modules_to_save": ["classifier"]}, False, tmp_path / str(i))
        assert "classifier" not in result.our_targets and result.our_targets


def test_class_05_empty_layers_to_transform_is_no_filter(tmp_path):
    result = _agree("gpt2", {"r": 4, "target_modules": ["c_attn"], "layers_to_transform": []},
                    False, tmp_path)
    assert len(result.our_targets) == 2


@pytest.mark.parametrize("name, fields", [
    ("llama", {"r": 4, "target_modules": ["q_proj", "lm_head"]}),
    ("bert", {"r": 4, "target_modules": ["query"], "bias": "all",
              "modules_to_save": ["classifier", "pooler"]}),
])
def test_class_06_load_peft_reads_base_layer_weights_and_saved_module_biases(tmp_path, name,
                                                                              fields):
    result = _agree(name, fields, False, tmp_path)
    assert result.checks["import_logits"] <= 1e-4


def test_class_07_t5_shared_follows_the_docs_and_warns(tmp_path):
    """With transformers 5, peft's adapter on T5's `shared` is never called (lookups go through
    encoder/decoder.embed_tokens): peft's logits stay the base model's. lora_jax applies it to
    the lookups (what adapting `shared` means), warns on save and load, and reads peft's file."""
    fields = {"r": 4, "target_modules": ["shared"]}
    result = compare("t5", fields, False, str(tmp_path))
    assert result.peft_targets == result.our_targets == {"shared": (4, 2.0)}
    assert {d.split(":")[0] for d in result.disagreements} <= {"import logits", "export logits"}
    arch = ARCHS["t5"]
    hf = arch.hf()
    config_hf = arch.module.config_from_hf(hf.config.to_dict())
    model = arch.module.build(config_hf)
    base = arch.module.params_from_hf(state_dict(hf), config_hf)
    with quiet():
        pm = peft.get_peft_model(arch.hf(), peft.LoraConfig(**fields))
        for n, p in pm.named_parameters():
            if "lora_embedding_" in n:
                p.data.normal_()
        pm.save_pretrained(str(tmp_path / "peft"))
    assert np.abs(torch_out(pm, arch.inputs) - torch_out(hf, arch.inputs)).max() < 1e-5
    with pytest.warns(UserWarning, match="peft with transformers 5 never applies an adapter"):
        params, config = lora_jax.load_peft(tmp_path / "peft", base, model_type="t5")
    ours = lora_jax.wrap(model.apply, config)({"params": params}, **arch.inputs)
    assert np.abs(np.asarray(ours) - torch_out(hf, arch.inputs)).max() > 1e-2
    with pytest.warns(UserWarning, match="never applies an adapter"):
        lora_jax.save_peft(tmp_path / "ours", params, config, model_type="t5")


@pytest.mark.parametrize("name, fields, hf_kwargs, scan", [
    ("gpt2", {"r": 4, "target_modules": ["c_attn"], "modules_to_save": ["wte"]}, None, False),
    ("gpt2", {"r": 4, "target_modules": ["c_attn"], "modules_to_save": ["wte"]}, None, True),
    ("bloom", {"r": 4, "target_modules": ["dense"], "modules_to_save": ["word_embeddings"]},
     None, False),
    ("llama", {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
     {"tied": True}, True),
])
def test_class_08_modules_to_save_on_a_tied_embedding_keeps_the_head_on_the_original(
        tmp_path, name, fields, hf_kwargs, scan):
    """peft trains a copy of a saved table for the lookups and keeps a tied head on the
    original; lora_jax keeps the original beside the trained table (`embedding_original`,
    frozen) and its tied head reads it: logits, files and merge agree with peft."""
    result = _agree(name, fields, scan, tmp_path, hf_kwargs=hf_kwargs)
    assert result.checks["import_logits"] <= 1e-4 and result.checks["export_logits"] <= 1e-4
    arch = ARCHS[name]
    hf = arch.hf(**(hf_kwargs or {}))
    config_hf = arch.module.config_from_hf(hf.config.to_dict())
    model = arch.module.build(config_hf)
    base = arch.module.params_from_hf(state_dict(hf), config_hf)
    config = lora_jax.LoraConfig(**fields)
    params = lora_jax.inject(base, config, jax.random.key(0),
                             layouts=lora_jax.layouts(model, **arch.inputs))
    table = fields["modules_to_save"][0]
    module = next(m for p, m in _modules(params) if p.endswith(table))
    trainable, frozen = lora_jax.split(params, config)
    assert next(m for p, m in _modules(frozen) if p.endswith(table))["embedding"] is None
    assert next(m for p, m in _modules(trainable) if p.endswith(table))[
        "embedding_original"] is None  # the original is frozen
    # A trained table: the wrapped head reads the original, merged params hold one table.
    changed = jax.tree.map(lambda x: x, params)
    target = next(m for p, m in _modules(changed) if p.endswith(table))
    target["embedding"] = module["embedding"] + jax.random.normal(
        jax.random.key(1), module["embedding"].shape)
    apply = lora_jax.wrap(model.apply, config)
    ids = arch.inputs["input_ids"]
    ours = np.asarray(apply({"params": changed}, input_ids=ids))
    merged = np.asarray(model.apply({"params": lora_jax.merge(changed, config)}, input_ids=ids))
    assert np.abs(ours - merged).max() > 1e-2  # merged: one table, the head follows it
    assert "embedding_original" not in next(
        m for p, m in _modules(lora_jax.merge(changed, config)) if p.endswith(table))


def _modules(params):
    from lora_jax.core.targets import iter_modules

    return list(iter_modules(params))


def test_class_08_t5_shared_in_modules_to_save_follows_the_docs_and_warns(tmp_path):
    """T5's `shared`: peft with transformers 5 never calls the trained copy (lookups go
    through encoder/decoder.embed_tokens), like class 7; lora_jax's lookups use it, and
    save/load warn."""
    fields = {"r": 4, "target_modules": ["q"], "modules_to_save": ["shared"]}
    result = compare("t5", fields, False, str(tmp_path))
    assert result.peft_targets == result.our_targets
    assert {d.split(":")[0] for d in result.disagreements} <= {"import logits", "export logits"}
    arch = ARCHS["t5"]
    hf = arch.hf()
    config_hf = arch.module.config_from_hf(hf.config.to_dict())
    base = arch.module.params_from_hf(state_dict(hf), config_hf)
    with pytest.warns(UserWarning, match="never calls its trained copy"):
        params, config = lora_jax.load_peft(tmp_path / "peft", base, model_type="t5")
    with pytest.warns(UserWarning, match="never calls its trained copy"):
        lora_jax.save_peft(tmp_path / "ours", params, config, model_type="t5")


def test_class_09_scanned_stacks_per_layer_exclusions_patterns_and_targets(tmp_path):
    cases = [
        ("gpt2", {"r": 4, "target_modules": ["c_attn", "c_proj"],
                  "exclude_modules": ["transformer.h.0.attn.c_attn"]}),
        ("llama", {"r": 4, "target_modules": r"model\.layers\.1\.self_attn\.(q|v)_proj"}),
        ("llama", {"r": 4, "target_modules": ["q_proj"], "layers_to_transform": [1],
                   "layers_pattern": "h"}),  # a wrong pattern: both refuse
        ("llama", {"r": 4, "target_modules": ["q_proj"], "layers_to_transform": [1],
                   "bias": "lora_only"}),  # no biases: nothing to refuse
        ("gpt2", {"r": 4, "target_modules": ["c_attn"], "layers_to_transform": [1],
                  "bias": "all"}),
        ("t5", {"r": 4, "target_modules": ["relative_attention_bias", "q"],
                "layers_to_transform": [0]}),
        ("llama", {"r": 4, "target_modules": ["q_proj", "v_proj"],
                   "rank_pattern": {"model.layers.0.self_attn.v_proj": 2},
                   "layers_to_transform": [0]}),  # the pattern covers every adapted layer
    ]
    for i, (name, fields) in enumerate(cases):
        result = _agree(name, fields, True, tmp_path / str(i))
        assert (result.peft_error is None) == (i != 2), (fields, result.peft_error)


@pytest.mark.parametrize("name, fields, expected", [
    ("llama", {"r": 4, "target_modules": ["q_proj"],
               "alpha_pattern": {"model.layers.0.self_attn.q_proj": 16}},
     {"model.layers.0.self_attn.q_proj": (4, 4.0), "model.layers.1.self_attn.q_proj": (4, 2.0)}),
    ("gpt2", {"r": 8, "lora_alpha": 16, "target_modules": ["c_attn"], "use_rslora": True,
              "rank_pattern": {"h.0.attn.c_attn": 2}, "alpha_pattern": {"h.1.attn.c_attn": 4}},
     {"transformer.h.0.attn.c_attn": (2, 16 / 2 ** 0.5),
      "transformer.h.1.attn.c_attn": (8, 4 / 8 ** 0.5)}),
    ("t5", {"r": 4, "target_modules": ["wi_0"],
            "rank_pattern": {"encoder.block.1.layer.1.DenseReluDense.wi_0": 1}},
     {"encoder.block.0.layer.1.DenseReluDense.wi_0": (4, 2.0),
      "encoder.block.1.layer.1.DenseReluDense.wi_0": (1, 8.0),
      "decoder.block.0.layer.2.DenseReluDense.wi_0": (4, 2.0),
      "decoder.block.1.layer.2.DenseReluDense.wi_0": (4, 2.0)}),
])
def test_class_09_scanned_stacks_take_per_layer_ranks_and_scales(tmp_path, name, fields,
                                                                 expected):
    """rank/alpha patterns naming single layers of a scanned stack: ranks padded to the
    stack's largest with zero columns of A / rows of B, scales as an array beside the factors;
    peft's r and scaling per layer, logits, merge and files both ways agree, and save_peft
    writes each layer unpadded."""
    result = _agree(name, fields, True, tmp_path)
    assert {k: (r, round(s, 6)) for k, (r, s) in result.our_targets.items()} == \
        {k: (r, round(s, 6)) for k, (r, s) in expected.items()}


def test_class_09_rank_padding_is_exact_under_training():
    """The padded columns of A / rows of B get zero gradients and stay zero through AdamW
    with weight decay, and count as peft counts (each layer at its own rank)."""
    import optax

    arch = ARCHS["gpt2"]
    hf = arch.hf()
    config_hf = arch.module.config_from_hf(hf.config.to_dict())
    model = arch.module.build(config_hf, scan_layers=True)
    base = arch.module.params_from_hf(state_dict(hf), config_hf, scan_layers=True)
    config = lora_jax.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False,
                                 rank_pattern={"h.1.attn.c_attn": 1})
    params = lora_jax.inject(base, config, jax.random.key(0),
                             layouts=lora_jax.layouts(model, **arch.inputs))
    node = params["transformer"]["h"]["attn"]["c_attn"]
    assert node["lora"].ranks == (4, 1) and node["lora_A"].shape == (2, 32, 4)
    trainable, frozen = lora_jax.split(params, config)
    apply = lora_jax.wrap(model.apply, config)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    state = tx.init(trainable)
    grad = jax.jit(jax.grad(lambda t: (apply({"params": lora_jax.combine(t, frozen)},
                                             **arch.inputs) ** 2).mean()))
    for _ in range(3):
        grads = grad(trainable)
        g = grads["transformer"]["h"]["attn"]["c_attn"]
        assert float(np.abs(g["lora_A"][1, :, 1:]).max()) == 0.0
        assert float(np.abs(g["lora_B"][1, 1:]).max()) == 0.0
        assert float(np.abs(g["lora_A"][1, :, :1]).max()) > 0  # the real rank trains
        updates, state = tx.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    node = trainable["transformer"]["h"]["attn"]["c_attn"]
    assert float(np.abs(node["lora_A"][1, :, 1:]).max()) == 0.0
    assert float(np.abs(node["lora_B"][1, 1:]).max()) == 0.0
    with quiet():
        pm = peft.get_peft_model(arch.hf(), peft.LoraConfig(
            r=4, target_modules=["c_attn"], rank_pattern={"h.1.attn.c_attn": 1}))
    assert lora_jax.count_parameters(params, config)[0] == pm.get_nb_trainable_parameters()[0]


def test_class_10_rank_above_the_smaller_dimension_warns(tmp_path):
    # BERT's classifier has 3 outputs; peft accepts r=4, so does lora_jax, with a warning.
    _agree("bert", {"r": 4, "target_modules": ["classifier", "query"]}, False, tmp_path)
    arch = ARCHS["bert"]
    hf = arch.hf()
    config_hf = arch.module.config_from_hf(hf.config.to_dict())
    base = arch.module.params_from_hf(state_dict(hf), config_hf, **arch.task)
    with pytest.warns(UserWarning, match="r=4 for 'classifier' is larger than min"):
        lora_jax.inject(base, lora_jax.LoraConfig(r=4, target_modules=["classifier"]),
                        jax.random.key(0))


def test_class_11_a_missing_layer_index_warns(tmp_path):
    result = _agree("gpt2", {"r": 4, "target_modules": ["c_attn"],
                             "layers_to_transform": [1, 5]}, False, tmp_path)
    assert list(result.our_targets) == ["transformer.h.1.attn.c_attn"]
    arch = ARCHS["gpt2"]
    hf = arch.hf()
    config_hf = arch.module.config_from_hf(hf.config.to_dict())
    base = arch.module.params_from_hf(state_dict(hf), config_hf)
    with pytest.warns(UserWarning, match=r"names layers \[5\]"):
        lora_jax.inject(base, lora_jax.LoraConfig(r=4, target_modules=["c_attn"],
                                                  layers_to_transform=[1, 5]), jax.random.key(0))


@pytest.mark.parametrize("name, target", [
    ("gpt2", r".*\.attn.*"),  # the GPT2Attention container
    ("gpt2", r".*ln_f"),  # a LayerNorm
    ("bert", ["output"]),  # BertOutput / BertSelfOutput containers
    ("llama", ["mlp"]),
])
def test_class_12_a_target_on_a_module_without_a_weight_raises_as_in_peft(tmp_path, name,
                                                                          target):
    result = _agree(name, {"r": 4, "target_modules": target}, False, tmp_path)
    assert result.peft_error and result.ours_error


def test_class_12_a_layer_filter_applies_before_the_module_check(tmp_path):
    # peft drops ln_f (no layer index) before it looks at its type: accepted on both sides.
    result = _agree("bloom", {"r": 4, "target_modules": ["dense", "ln_f"],
                              "layers_to_transform": [1]}, True, tmp_path)
    assert result.peft_error is None and result.our_targets


def test_class_13_full_names_skip_the_layer_filter_only_in_peft(tmp_path):
    """peft's code lets a module named in full skip layers_to_transform; its docs (and lora_jax)
    apply the filter. load_peft still loads peft's file (warning), save_peft writes a file that
    peft loads with exactly lora_jax's modules."""
    fields = {"r": 4, "target_modules": ["transformer.h.0.attn.c_attn", "c_fc"],
              "layers_to_transform": [1]}
    result = compare("gpt2", fields, False, str(tmp_path))
    assert result.quirk and not result.disagreements, result.disagreements
    assert set(result.peft_targets) - set(result.our_targets) == {"transformer.h.0.attn.c_attn"}
    arch = ARCHS["gpt2"]
    hf = arch.hf()
    config_hf = arch.module.config_from_hf(hf.config.to_dict())
    base = arch.module.params_from_hf(state_dict(hf), config_hf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, config = lora_jax.load_peft(os.path.join(tmp_path, "peft"), base,
                                            model_type="gpt2")
    assert any("skip layers_to_transform" in str(w.message) or "in full" in str(w.message)
               for w in caught)
    assert "lora_A" in params["transformer"]["h_0"]["attn"]["c_attn"]


def test_t5_float32_rounding_judged_by_float64(tmp_path):
    """The 200-config T5 run's logit disagreements (1.4e-4..5.3e-4, all-linear, mostly rsLoRA)
    were peft's float32 rounding, not semantics: T5's attention has no 1/sqrt(d), so with large
    adapter scales the softmax amplifies rounding. peft in float64 is the judge: lora_jax's
    float32 logits are within 1e-4 of it, and a real error of 1e-3 is still caught."""
    from parity_harness import TOL, Result, _logits_diff

    fields = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "use_rslora": True}
    result = _agree("t5", fields, False, tmp_path)
    assert result.checks.get("import_logits_float64", result.checks["import_logits"]) <= TOL
    arch = ARCHS["t5"]
    hf = arch.hf()
    with quiet():
        pm = peft.get_peft_model(hf, peft.LoraConfig(**fields))
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data.normal_(0, 0.3)
    exact = torch_out(pm.double(), arch.inputs)
    check = Result()
    _logits_diff(check, "import", (exact + 1e-3 * np.abs(exact).max()).astype(np.float32),
                 pm, arch)
    assert check.disagreements and check.checks["import_logits_float64"] > TOL


@pytest.mark.full  # a harness judge, not a library fix: 7 s the CI tier has no room for
def test_qwen2_float32_conditioning_judged_by_jitter(tmp_path):
    """The 200-config Qwen2 run's one logit disagreement (export 1.0e-3, float64 peft 8.5e-4,
    peft's own float32 error 1.7e-4) is float32 conditioning: rounding our float32 params
    differently moves our logits by more (scale 16 on every Linear). peft in float64 is no
    exact judge there (HF's RMSNorm and rotary run in float32 in a float64 model); the harness
    then measures that spread, and a real error far beyond it is still caught."""
    from parity_harness import Result, _logits_diff

    fields = {"r": 1, "lora_alpha": 16, "target_modules": "all-linear"}
    result = _agree("qwen2", fields, False, tmp_path)
    spread = result.checks["export_logits_float32_jitter"]
    assert result.checks["export_logits_float64"] <= 4 * spread
    arch = ARCHS["qwen2"]
    with quiet():
        pm = peft.get_peft_model(arch.hf(), peft.LoraConfig(**fields))
    exact = torch_out(pm, arch.inputs)
    check = Result()
    _logits_diff(check, "export", (exact + 10 * spread * np.abs(exact).max()).astype(np.float32),
                 pm, arch, jitter=lambda: spread)
    assert check.disagreements


def test_class_08_nnx_warns_that_its_tied_head_follows_the_table():
    from flax import nnx

    import lora_jax.nnx.frontend as lnnx

    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(11, 4, rngs=rngs)
            self.proj = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, ids):
            return self.embed.attend(self.proj(self.embed(ids)))

    config = lora_jax.LoraConfig(r=2, target_modules=["proj"], modules_to_save=["embed"])
    with pytest.warns(UserWarning, match="NNX frontend trains each table in place"):
        lnnx.inject(Tied(nnx.Rngs(0)), config, nnx.Rngs(1))


def test_two_pattern_keys_on_one_module_load_as_peft_reloads_its_file(tmp_path):
    """Found by the 200-config BERT run: peft takes the first matching alpha_pattern key in
    dict order but writes the patterns with sorted keys, so with {"key": 2, "<full path>": 32}
    its in-memory model scales layer 0's key by 0.5 and its own reload of the file by 8.
    load_peft reads the file as peft's reload does."""
    fields = {"r": 4, "lora_alpha": 8, "target_modules": ["key"],
              "alpha_pattern": {"key": 2, "bert.encoder.layer.0.attention.self.key": 32}}
    result = _agree("bert", fields, False, tmp_path)
    assert result.checks["import_logits"] > 1e-2  # peft's in-memory model: another scale
    assert result.checks["import_logits_peft_reload"] <= 1e-4


def test_t5_shared_named_in_full_with_a_layer_filter(tmp_path):
    """Found by the 200-config T5 run: classes 7 and 13 together. peft adapts `shared` (named in
    full, it skips layers_to_transform) but never calls it; load_peft loads it (warning) and
    applies it to the lookups, so only the import logits differ."""
    fields = {"r": 8, "lora_alpha": 16, "layers_to_transform": [1, 5],
              "target_modules": ["encoder.block.0.layer.0.SelfAttention.k", "shared",
                                 "encoder.block.1.layer.1.DenseReluDense.wi_1"]}
    result = compare("t5", fields, False, str(tmp_path))
    assert result.quirk and "shared" in result.peft_targets
    assert [d.split(":")[0] for d in result.disagreements] == ["import logits"]


def test_moe_experts_and_router_in_modules_to_save(tmp_path):
    """Found by the MoE families' differential run: the fused experts and the router keep their
    params under the PyTorch names (`gate_up_proj`, `down_proj`, `weight`); save_peft refused
    them in modules_to_save ("no PyTorch name") and load_peft did not place peft's copies."""
    fields = {"r": 2, "lora_alpha": 16, "target_modules": ["o_proj"],
              "modules_to_save": ["mlp.experts", "gate"]}
    result = _agree("qwen3_moe", fields, False, tmp_path)
    assert result.checks["import_logits"] <= 1e-4 and result.checks["export_logits"] <= 1e-4


def test_lora_on_a_scaled_embedding_is_scaled_as_its_lookups(tmp_path):
    """Found by the Gemma 3 differential run: Gemma multiplies its embedding lookups by
    sqrt(hidden_size) and peft scales an embedding adapter's output by that `embed_scale` too
    (as merging it into the table does); lora_jax added the delta unscaled (logits off by ~1)."""
    result = _agree("gemma3_text", {"r": 2, "target_modules": ["embed_tokens"]}, False,
                    tmp_path)
    assert result.checks["import_logits"] <= 1e-4 and result.checks["export_logits"] <= 1e-4
