"""peft adapter interop on GPT-2 and a custom model: peft -> lora_jax, lora_jax -> peft (logits,
merge_and_unload), file-level equality with what peft writes, bfloat16 files, path maps.
Real peft on tiny random HF models; float32, tolerances in peft_checks.TOL."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from peft_checks import (
    TOL,
    assert_same_files,
    base_params,
    load_peft,
    max_diff,
    peft_adapter,
    peft_to_jax,
    read_adapter,
    save_peft,
    state_dict,
    tiny_hf,
    torch_out,
    train,
)

import lora_jax
from lora_jax.models import gpt2
from lora_jax.models.stacking import stack_layers

INPUTS = {"input_ids": np.random.RandomState(0).randint(0, 99, (2, 8))}
# c_attn (Conv1D, fan_in_fan_out) and wte (Embedding), per-module rank and alpha, trained biases.
GPT2_LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], bias="lora_only",
                 rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"wte": 4})


def gpt2_hf() -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4, initializer_range=0.2, bos_token_id=0,
                                     eos_token_id=0)
    return tiny_hf(transformers.GPT2LMHeadModel, config)


def lm_loss(logits: jax.Array) -> jax.Array:
    ids = INPUTS["input_ids"]
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


def test_gpt2_peft_to_jax(tmp_path):
    hf = gpt2_hf()
    model, base = base_params(gpt2, hf)
    pm = peft_adapter(hf, str(tmp_path), **GPT2_LORA)
    diff = peft_to_jax(gpt2, model, base, pm, str(tmp_path), INPUTS, model_type="gpt2")
    assert diff <= TOL
    # Without model_type the layer lists are inferred from the tree (h_0, h_1; not ln_1, ln_2).
    assert peft_to_jax(gpt2, model, base, pm, str(tmp_path), INPUTS) == diff
    params, config = load_peft(str(tmp_path), base)
    assert config.rank_pattern == {"h.1.attn.c_attn": 2}
    assert params["transformer"]["h_1"]["attn"]["c_attn"]["lora_A"].shape == (32, 2)
    assert params["transformer"]["wte"]["lora_embedding_A"].shape == (99, 4)
    assert base["transformer"]["h_1"]["attn"]["c_attn"].keys() == {"kernel", "bias"}
    print(f"gpt2 peft->jax max diff {diff:.2e}")


def test_gpt2_scanned_peft_to_jax(tmp_path):
    # rsLoRA, all biases trained, only layer 1 adapted: layer 0 of the stack gets A = B = 0.
    hf = gpt2_hf()
    model, base = base_params(gpt2, hf, scan_layers=True)
    pm = peft_adapter(hf, str(tmp_path), r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                      use_rslora=True, bias="all", layers_to_transform=[1],
                      task_type="CAUSAL_LM")
    diff = peft_to_jax(gpt2, model, base, pm, str(tmp_path), INPUTS, model_type="gpt2")
    assert diff <= TOL
    params, config = load_peft(str(tmp_path), base, model_type="gpt2")
    a = params["transformer"]["h"]["mlp"]["c_fc"]["lora_A"]
    assert a.shape == (2, 32, 4) and not a[0].any() and a[1].any()
    assert config.use_rslora and config.layers_to_transform == (1,)
    # Trained LayerNorm biases of the stack were loaded too.
    ln = params["transformer"]["h"]["ln_1"]["bias"]
    assert max_diff(ln[1], pm.base_model.model.transformer.h[1].ln_1.bias.detach()) == 0
    print(f"gpt2 scanned peft->jax max diff {diff:.2e}")


def test_gpt2_jax_to_peft_logits_and_merge(tmp_path):
    hf = gpt2_hf()
    model, base = base_params(gpt2, hf)
    config = lora_jax.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "wte"],
                                 bias="lora_only", use_rslora=True)
    apply = lora_jax.wrap(model.apply, config)
    params = lora_jax.inject(base, config, jax.random.key(0),
                             layouts=lora_jax.layouts(model, INPUTS["input_ids"]))
    params = train(params, config, lm_loss, apply, (INPUTS["input_ids"],))
    assert np.abs(params["transformer"]["h_0"]["attn"]["c_proj"]["lora_B"]).max() > 0
    save_peft(tmp_path / "flat", params, config, model_type="gpt2", task_type="CAUSAL_LM")
    pm = peft.PeftModel.from_pretrained(gpt2_hf(), tmp_path / "flat").eval()
    ours = apply({"params": params}, INPUTS["input_ids"])
    logits_diff = max_diff(ours, torch_out(pm, INPUTS))
    assert logits_diff <= TOL
    merged_ref = gpt2.params_from_hf(state_dict(pm.merge_and_unload()), model.config)
    merged = lora_jax.merge(params, config)
    merge_diff = max(jax.tree.leaves(jax.tree.map(max_diff, merged, merged_ref)))
    assert merge_diff <= 1e-5
    # The same adapter on scanned params writes the same tensors.
    save_peft(tmp_path / "scan", stack_layers(params, "transformer.h"), config,
              model_type="gpt2", task_type="CAUSAL_LM")
    flat, _, flat_config = read_adapter(str(tmp_path / "flat"))
    scan, _, scan_config = read_adapter(str(tmp_path / "scan"))
    assert flat.keys() == scan.keys() and flat_config == scan_config
    assert all(torch.equal(flat[k], scan[k]) for k in flat)
    print(f"gpt2 jax->peft logits diff {logits_diff:.2e}, merge diff {merge_diff:.2e}")


@pytest.mark.parametrize("lora, task_type", [
    (GPT2_LORA, None),
    (dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], bias="all", use_rslora=True,
          layers_to_transform=[0], lora_dropout=0.1), "CAUSAL_LM"),
])
def test_gpt2_files_match_what_peft_writes(tmp_path, lora, task_type):
    hf = gpt2_hf()
    _, base = base_params(gpt2, hf)
    peft_adapter(hf, str(tmp_path / "peft"), task_type=task_type, **lora)
    config = lora_jax.LoraConfig(**lora, task_type=task_type)
    params = lora_jax.inject(base, config, jax.random.key(0))
    save_peft(tmp_path / "ours", params, config, model_type="gpt2")
    assert_same_files(str(tmp_path / "ours"), str(tmp_path / "peft"))
    # load -> save reproduces peft's tensors exactly (the loaded config keeps task_type).
    loaded, loaded_config = load_peft(tmp_path / "peft", base, model_type="gpt2")
    assert loaded_config.task_type == task_type
    save_peft(tmp_path / "again", loaded, loaded_config, model_type="gpt2")
    theirs, _, _ = read_adapter(str(tmp_path / "peft"))
    again, _, _ = read_adapter(str(tmp_path / "again"))
    assert all(torch.equal(theirs[k], again[k]) for k in theirs)


def test_bfloat16_adapter_loads(tmp_path):
    hf = gpt2_hf()
    model, base = base_params(gpt2, hf)
    pm = peft_adapter(hf, str(tmp_path / "f32"), r=4, target_modules=["c_attn"])
    pm.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tensors, _, _ = read_adapter(str(tmp_path / "bf16"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    params, config = load_peft(tmp_path / "bf16", base)
    a = params["transformer"]["h_0"]["attn"]["c_attn"]["lora_A"]
    assert a.dtype == jnp.float32
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    assert max_diff(a, tensors[key].float().numpy().T) == 0
    # peft upcasts the bf16 adapter onto a float32 model; our logits match it.
    ref = peft.PeftModel.from_pretrained(gpt2_hf(), tmp_path / "bf16").eval()
    out = lora_jax.wrap(model.apply, config)({"params": params}, INPUTS["input_ids"])
    assert max_diff(out, torch_out(ref, INPUTS)) <= TOL


class _Custom(nn.Module):
    """A model whose names differ from its PyTorch counterpart's (needs a path_map)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="head")(nn.tanh(nn.Dense(8, name="enc_q")(x)))


def test_path_map_round_trip(tmp_path):
    x = jnp.ones((2, 6))
    base = _Custom().init(jax.random.key(0), x)["params"]
    config = lora_jax.LoraConfig(r=2, target_modules=["enc_q"], modules_to_save=["head"],
                                 init_lora_weights=False)
    params = lora_jax.inject(base, config, jax.random.key(1))
    params["head"] = jax.tree.map(lambda v: v + 1, base["head"])  # "trained" in full
    names = {"enc_q": "encoder.q", "head": "classifier"}
    save_peft(tmp_path, params, config, path_map=names)
    tensors, _, fields = read_adapter(str(tmp_path))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.encoder.q.lora_A.weight": (2, 6),
        "base_model.model.encoder.q.lora_B.weight": (8, 2),
        "base_model.model.classifier.weight": (4, 8),
        "base_model.model.classifier.bias": (4,)}
    assert fields["target_modules"] == ["encoder.q"]
    assert fields["modules_to_save"] == ["classifier"]
    loaded, loaded_config = load_peft(tmp_path, base, path_map=lambda p: names.get(p))
    assert loaded_config.target_modules == ("enc_q",)
    assert loaded_config.modules_to_save == ("head",)
    assert jax.tree.map(max_diff, loaded, params) == jax.tree.map(lambda _: 0.0, params)
    assert max_diff(loaded["head"]["kernel"], base["head"]["kernel"]) == pytest.approx(1.0)
    apply = lora_jax.wrap(_Custom().apply, loaded_config)
    assert max_diff(apply({"params": loaded}, x),
                    lora_jax.wrap(_Custom().apply, config)({"params": params}, x)) == 0


class _Heads(nn.Module):
    """Kernels of several input / output axes: an einsum [D, N, H] and DenseGenerals
    [D, N, H] / [N, H, D] (PyTorch stores them as Linears [N*H, D] / [D, N*H])."""

    @nn.compact
    def __call__(self, x):
        q = nn.Einsum((6, 2, 4), "btd,dnh->btnh", use_bias=False, name="q")(x)
        k = nn.DenseGeneral((2, 4), use_bias=False, name="k")(x)
        return nn.DenseGeneral(6, axis=(-2, -1), use_bias=False, name="o")(q + k)


def _torch_heads(params):
    """The PyTorch twin of `_Heads`: Linears holding the row-major flattened kernels."""
    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(6, 8, bias=False), torch.nn.Linear(6, 8, bias=False)
            self.o = torch.nn.Linear(8, 6, bias=False)

        def forward(self, x):
            return self.o(self.q(x) + self.k(x))

    twin = Twin()
    with torch.no_grad():
        for name, n_in in (("q", 6), ("k", 6), ("o", 8)):
            kernel = np.asarray(params[name]["kernel"]).reshape(n_in, -1)
            getattr(twin, name).weight.copy_(torch.tensor(kernel.T))
    return twin.eval()


@pytest.mark.parametrize("dora", [False, True])
def test_multi_axis_kernels_are_written_and_read_as_their_flattened_linear(dora, tmp_path):
    """linen, as the NNX frontend: peft's files hold the Linear of each kernel's row-major
    flattening; peft's forward and merge agree with lora_jax's, and loading restores the
    kernels' own axes."""
    x = np.random.RandomState(0).randn(2, 3, 6).astype(np.float32)
    model = _Heads()
    base = model.init(jax.random.key(0), x)["params"]
    layouts = lora_jax.layouts(model, x)
    # peft has no DoRA for einsum kernels: DoRA targets the DenseGenerals.
    config = lora_jax.LoraConfig(r=2, lora_alpha=4, target_modules=["k", "o"] if dora else
                                 ["q", "k", "o"], use_dora=dora, init_lora_weights=False)
    params = lora_jax.inject(base, config, jax.random.key(1), layouts=layouts)
    ours = lora_jax.wrap(model.apply, config)({"params": params}, x)
    save_peft(tmp_path, params, config, path_map=lambda p: p)
    tensors, _, _ = read_adapter(str(tmp_path))
    assert tensors["base_model.model.o.lora_A.weight"].shape == (2, 8)
    assert tensors["base_model.model.k.lora_B.weight"].shape == (8, 2)
    pm = peft.PeftModel.from_pretrained(_torch_heads(base), tmp_path).eval()
    with torch.no_grad():
        assert max_diff(ours, pm(torch.tensor(x)).numpy()) <= TOL
        merged = pm.merge_and_unload()(torch.tensor(x)).numpy()
    assert max_diff(model.apply({"params": lora_jax.merge(params, config)}, x), merged) <= TOL
    loaded, loaded_config = load_peft(tmp_path, base, path_map=lambda p: p, layouts=layouts)
    assert loaded["o"]["lora_A"].shape == (2, 4, 2) and loaded["k"]["lora_B"].shape == (2, 2, 4)
    assert jax.tree.map(max_diff, loaded, params) == jax.tree.map(lambda _: 0.0, params)
    assert max_diff(lora_jax.wrap(model.apply, loaded_config)({"params": loaded}, x), ours) == 0
