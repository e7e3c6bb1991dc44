"""VeRA against peft's (`peft.tuners.vera`, PyTorch): config fields, the shared projections
(bit-exact), layer outputs and merged weights, trainable counts, and peft's files."""

import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from lora_jax.core.factors import Layout, dense_delta
from lora_jax.variants import vera
from lora_jax.variants.vera import VeraConfig

TOL = 1e-5  # float32, one layer


class Layers(torch.nn.Module):
    """Linear layers of different shapes (applied separately)."""

    def __init__(self):
        super().__init__()
        self.wide = torch.nn.Linear(12, 7)
        self.tall = torch.nn.Linear(5, 16)
        self.square = torch.nn.Linear(9, 9, bias=False)

    def forward(self, x):
        return self.wide(x)


def _peft_layers(seed: int, **fields):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Layers(), peft.VeraConfig(
            target_modules=["wide", "tall", "square"], **fields))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained lambdas: random, non-zero
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator))
    return model.eval()


def _numpy(t):
    return t.detach().numpy().copy()


def test_config_fields_and_defaults_are_peft_s():
    ours = VeraConfig().to_dict()
    theirs = peft.VeraConfig().to_dict()
    assert {k: theirs[k] for k in ours} == ours
    # peft's other fields describe the file or the base model, not the adapter's math.
    assert set(theirs) - set(ours) == {"fan_in_fan_out", "peft_type", "auto_mapping",
                                       "base_model_name_or_path", "revision", "inference_mode",
                                       "peft_version"}
    config = VeraConfig(r=8, target_modules=["q", "v"], layers_to_transform=[0, 1])
    assert config == VeraConfig.from_dict(config.to_dict()) and hash(config) == hash(
        VeraConfig.from_dict(config.to_dict()))


@pytest.mark.parametrize("fields, match", [
    ({"r": 0}, "positive integer"), ({"r": 2.0}, "positive integer"),
    ({"vera_dropout": 1.0}, r"\[0, 1\)"), ({"d_initial": float("nan")}, "finite"),
    ({"bias": "lora_only"}, "vera_only"), ({"projection_prng_key": 1.5}, "integer"),
    ({"save_projection": 1}, "True or False"), ({"layers_pattern": "h"}, "layers_to_transform"),
    ({"target_modules": ".*q", "layers_to_transform": [1]}, "ignores"),
])
def test_config_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        VeraConfig(**fields)
    with pytest.raises(TypeError, match="did you mean 'vera_dropout'"):
        VeraConfig(dropout=0.1)


@pytest.mark.parametrize("key", [0, 7, 2**40 + 3])
def test_projections_are_peft_s_bit_for_bit(key):
    model = _peft_layers(0, r=6, projection_prng_key=key)
    a, b = vera.projections(VeraConfig(r=6, projection_prng_key=key), 12, 16)
    np.testing.assert_array_equal(a, _numpy(model.base_model.vera_A["default"]).T)
    np.testing.assert_array_equal(b, _numpy(model.base_model.vera_B["default"]).T)


@pytest.mark.parametrize("init_weights", [True, False])
def test_lambdas_initialise_as_peft_s(init_weights):
    config = VeraConfig(r=6, d_initial=0.25, init_weights=init_weights)
    d, b = vera.init_lambdas((2, 5, 16), Layout("dense", stacked=1), config, jax.random.key(0))
    assert d.shape == (2, 6) and b.shape == (2, 16)
    torch.manual_seed(0)
    layer = peft.get_peft_model(Layers(), peft.VeraConfig(
        r=6, d_initial=0.25, init_weights=init_weights, target_modules=["tall"])).base_model \
        .model.tall
    np.testing.assert_array_equal(b[0], _numpy(layer.vera_lambda_b["default"]))
    if init_weights:
        np.testing.assert_array_equal(d[0], _numpy(layer.vera_lambda_d["default"]))
    else:  # torch.randn from torch's global generator: only the distribution is peft's
        assert float(jnp.std(d)) > 0.3 and not bool(jnp.all(d[0] == d[1]))


def _ours(model, config, name, stacked=False):
    """Our leaves for peft's layer `name`: the slices of our projections and its lambdas."""
    layer = getattr(model.base_model.model, name)
    w = _numpy(layer.base_layer.weight).T  # [in, out]
    a_full, b_full = vera.projections(config, 12, 16)
    layout = Layout("dense", stacked=int(stacked))
    shape = (2, *w.shape) if stacked else w.shape
    a, b = vera.layer_projections(a_full, b_full, shape, layout)
    d, lb = (_numpy(getattr(layer, f"vera_lambda_{n}")["default"]) for n in "db")
    if stacked:  # a stack of the same layer twice, the second with other lambdas
        d, lb = np.stack([d, -2 * d]), np.stack([lb, lb[::-1]])
    return w, a, b, d, lb, layout, shape


@pytest.mark.parametrize("name", ["wide", "tall", "square"])
def test_layer_output_and_merge_match_peft(name):
    config = VeraConfig(r=6, projection_prng_key=3, target_modules=["wide", "tall", "square"])
    model = _peft_layers(1, r=6, projection_prng_key=3)
    w, a, b, d, lb, layout, shape = _ours(model, config, name)
    layer = getattr(model.base_model.model, name)
    x = np.random.RandomState(0).randn(3, 4, w.shape[0]).astype(np.float32)
    with torch.no_grad():
        want = _numpy(layer(torch.tensor(x)))
    bias = 0 if layer.base_layer.bias is None else _numpy(layer.base_layer.bias)
    got = x @ w + bias + dense_delta(jnp.asarray(x), *vera.scaled_projections(a, b, d, lb))
    assert np.abs(got - want).max() <= TOL * max(1.0, np.abs(want).max())
    assert np.abs(want - (x @ w + bias)).max() > 0.1  # the adapter changes the output
    merged = w + vera.merge_delta(a, b, d, lb, layout, shape)
    model.merge_adapter()
    np.testing.assert_allclose(merged, _numpy(layer.base_layer.weight).T, atol=TOL, rtol=0)


def test_stacked_layers_merge_each_layer_as_peft():
    config = VeraConfig(r=6)
    model = _peft_layers(2, r=6)
    w, a, b, d, lb, layout, shape = _ours(model, config, "wide", stacked=True)
    assert a.shape == (2, 12, 6) and b.shape == (2, 6, 7)
    delta = vera.merge_delta(a, b, d, lb, layout, shape)
    for i in range(2):
        layer = model.base_model.model.wide
        with torch.no_grad():
            layer.vera_lambda_d["default"].copy_(torch.tensor(d[i]))
            layer.vera_lambda_b["default"].copy_(torch.tensor(lb[i]))
        np.testing.assert_allclose(delta[i], _numpy(layer.get_delta_weight("default")).T,
                                   atol=TOL, rtol=0)


def test_projections_too_small_for_a_layer_raise_as_peft():
    a, b = vera.projections(VeraConfig(r=4), 8, 8)
    with pytest.raises(ValueError, match="too small .* 9 inputs"):
        vera.layer_projections(a, b, (9, 4), Layout("dense"))
    with pytest.raises(ValueError, match="not slices of one shared pair"):
        vera.shared_projections([(a, b), (a[:4] + 1, b)])


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)).eval()
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32)).eval()


@pytest.mark.parametrize("kind, targets, max_in_out", [
    ("llama", ["q_proj", "k_proj", "down_proj"], (64, 32)),
    ("bert", ["query", "value", "intermediate.dense"], (32, 64)),
])
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_files_keys_shapes_and_projections(tmp_path, kind, targets, max_in_out,
                                                save_projection):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_tiny(kind), peft.VeraConfig(
            r=4, target_modules=targets, projection_prng_key=5, save_projection=save_projection))
        model.save_pretrained(tmp_path)
    tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    config = VeraConfig(r=4, target_modules=targets, projection_prng_key=5,
                        save_projection=save_projection)
    a, b = vera.projections(config, *max_in_out)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.vera.Linear)}
    n_trained = 0
    for name, layer in layers.items():
        n_in, n_out = layer.in_features, layer.out_features
        assert tensors[name + ".vera_lambda_d"].shape == (4,)
        assert tensors[name + ".vera_lambda_b"].shape == (n_out,)
        n_trained += 4 + n_out
        sliced = vera.layer_projections(a, b, (n_in, n_out), Layout("dense"))
        np.testing.assert_array_equal(sliced[0], _numpy(layer.vera_A["default"][:, :n_in]).T)
        np.testing.assert_array_equal(sliced[1], _numpy(layer.vera_B["default"][:n_out]).T)
    lambdas = {k for k in tensors if ".vera_lambda_" in k}
    assert len(lambdas) == 2 * len(layers) == 12
    assert n_trained == model.get_nb_trainable_parameters()[0]
    if save_projection:
        assert set(tensors) - lambdas == {"base_model.vera_A", "base_model.vera_B"}
        np.testing.assert_array_equal(tensors["base_model.vera_A"], a.T)
        np.testing.assert_array_equal(tensors["base_model.vera_B"], b.T)
        slices = [vera.layer_projections(a, b, (m.in_features, m.out_features), Layout("dense"))
                  for m in layers.values()]
        full = vera.shared_projections(slices)
        np.testing.assert_array_equal(full[0], a)
        np.testing.assert_array_equal(full[1], b)
    else:
        assert set(tensors) == lambdas
    # The file's config: peft's VeraConfig fields; ours read back from it.
    fields = peft.VeraConfig.from_pretrained(tmp_path).to_dict()
    assert fields["peft_type"] == "VERA"
    ours = {k: v for k, v in fields.items() if k in VeraConfig().to_dict()}
    ours["target_modules"] = sorted(ours["target_modules"])
    assert VeraConfig.from_dict(ours) == dataclasses.replace(config,
                                                             target_modules=tuple(sorted(targets)))


# --- end to end, through the same calls as LoRA ----------------------------------------------

E2E = {"llama": ["q_proj", "v_proj", "down_proj"],  # in/out 32/32, 32/16, 64/32
       "bert": ["query", "value", "intermediate.dense", "output.dense"]}  # 32/64, 64/32 too
E2E_TOL = 1e-4


def _peft_vera(arch, path, **fields):
    """peft's VeRA on the tiny `arch` with random non-zero lambdas, saved to `path`."""
    from parity_harness import quiet

    with quiet():
        model = peft.get_peft_model(arch.hf(), peft.VeraConfig(**fields))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    model.eval().save_pretrained(path)
    return model


def _merged_diff(arch, config_hf, scan, params, config, peft_model):
    from peft_checks import max_diff, state_dict

    import lora_jax

    want = arch.module.params_from_hf(state_dict(peft_model.merge_and_unload()), config_hf,
                                      scan_layers=scan, **arch.task)
    got = lora_jax.merge(params, config)
    return max(jax.tree.leaves(jax.tree.map(max_diff, got, want)))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_peft_vera_adapter_loads_and_runs_as_in_peft(tmp_path, name, scan):
    from parity_harness import ARCHS, _close
    from peft_checks import base_params, torch_out

    import lora_jax

    arch = ARCHS[name]
    fields = dict(r=8, target_modules=E2E[name], projection_prng_key=11)
    pm = _peft_vera(arch, tmp_path, **fields)
    model, base = base_params(arch.module, arch.hf(), scan_layers=scan, build_kwargs=arch.task,
                              load_kwargs=arch.task)
    params, config = lora_jax.load_peft(tmp_path, base, model_type=name)
    assert isinstance(config, VeraConfig) and config.r == 8
    ours = lora_jax.wrap(model.apply, config)({"params": params}, **arch.inputs)
    with torch.no_grad():
        theirs = torch_out(pm, arch.inputs)
    base_out = model.apply({"params": base}, **arch.inputs)
    assert _close(np.asarray(base_out), theirs, arch) > 100 * E2E_TOL  # the adapter matters
    assert _close(np.asarray(ours), theirs, arch) <= E2E_TOL
    assert lora_jax.count_parameters(params, config)[0] == pm.get_nb_trainable_parameters()[0]
    assert _merged_diff(arch, model.config, scan, params, config, pm) <= E2E_TOL


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_vera_trained_here_loads_in_peft(tmp_path, name, scan):
    from parity_harness import ARCHS, _close, quiet
    from peft_checks import base_params, read_adapter, torch_out, train

    import lora_jax

    arch = ARCHS[name]
    config = VeraConfig(r=8, target_modules=E2E[name], projection_prng_key=11)
    model, base = base_params(arch.module, arch.hf(), scan_layers=scan, build_kwargs=arch.task,
                              load_kwargs=arch.task)
    params = lora_jax.inject(base, config, jax.random.key(0),
                             layouts=lora_jax.layouts(model, **arch.inputs))
    apply = lora_jax.wrap(model.apply, config)
    np.testing.assert_allclose(apply({"params": params}, **arch.inputs),  # lambda_b = 0
                               model.apply({"params": base}, **arch.inputs), atol=1e-6, rtol=0)
    trained = train(params, config, lambda out: (out ** 2).mean(), apply, arch.inputs)
    moved, frozen = lora_jax.split(trained, config)
    assert all(n.startswith("vera_lambda") for n in _names(moved))  # only the lambdas train
    for a, b in zip(jax.tree.leaves(lora_jax.split(params, config)[1]), jax.tree.leaves(frozen),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    lora_jax.save_peft(tmp_path / "ours", trained, config, model_type=name)
    with quiet():  # peft's own file for the same config: same keys, shapes and fields
        reference = peft.get_peft_model(arch.hf(), peft.VeraConfig(
            r=8, target_modules=E2E[name], projection_prng_key=11))
        reference.save_pretrained(tmp_path / "peft")
        pm = peft.PeftModel.from_pretrained(arch.hf(), tmp_path / "ours").eval()
    ours_t, _, ours_c = read_adapter(tmp_path / "ours")
    peft_t, _, peft_c = read_adapter(tmp_path / "peft")
    assert {k: v.shape for k, v in ours_t.items()} == {k: v.shape for k, v in peft_t.items()}
    for key in ("base_model.vera_A", "base_model.vera_B"):
        np.testing.assert_array_equal(ours_t[key], peft_t[key])
    ours_c["target_modules"], peft_c["target_modules"] = (
        sorted(c["target_modules"]) for c in (ours_c, peft_c))
    assert ours_c == {**peft_c, "auto_mapping": ours_c["auto_mapping"]}
    logits = np.asarray(apply({"params": trained}, **arch.inputs))
    with torch.no_grad():
        assert _close(logits, torch_out(pm, arch.inputs), arch) <= E2E_TOL
    assert lora_jax.count_parameters(trained, config)[0] == \
        reference.get_nb_trainable_parameters()[0]
    assert _merged_diff(arch, model.config, scan, trained, config, pm) <= E2E_TOL


def _names(tree):
    return {str(path[-1].key) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("scan", [False, True])
def test_vera_through_the_nnx_frontend_both_ways(tmp_path, scan):
    import optax
    from flax import nnx
    from parity_harness import ARCHS, quiet
    from peft_checks import max_diff, state_dict, torch_out

    import lora_jax.nnx.frontend as lnnx
    from lora_jax.models import nnx_llama

    arch, ids = ARCHS["llama"], {"input_ids": ARCHS["llama"].inputs["input_ids"]}

    def model():
        hf = arch.hf()
        return nnx_llama.from_hf(state_dict(hf), nnx_llama.config_from_hf(hf.config.to_dict()),
                                 scan_layers=scan)

    config = VeraConfig(r=8, target_modules=E2E["llama"], projection_prng_key=11)
    ours = model()
    lnnx.inject(ours, config, nnx.Rngs(0))
    assert all(isinstance(v, nnx.LoRAParam) == k.startswith("vera_lambda")
               for path, v in nnx.iter_graph(ours) if isinstance(v, nnx.Variable)
               and (k := str(path[-1])).startswith("vera"))
    optimizer = nnx.Optimizer(ours, optax.adam(3e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss = lambda m: (m(**ids) ** 2).mean()
        optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))

    for _ in range(3):
        step(ours, optimizer)
    lnnx.save_peft(tmp_path / "ours", ours, config, model_type="llama")
    with quiet():
        pm = peft.PeftModel.from_pretrained(arch.hf(), tmp_path / "ours").eval()
    theirs = torch_out(pm, ids)
    assert max_diff(ours(**ids), torch_out(arch.hf(), ids)) > 100 * E2E_TOL
    assert max_diff(ours(**ids), theirs) <= E2E_TOL
    assert max_diff(lnnx.merge(ours, config)(**ids), torch_out(pm.merge_and_unload(), ids)) \
        <= E2E_TOL
    assert lnnx.count_parameters(ours, config)[0] == 2 * sum(8 + n for n in (32, 16, 32))
    # peft's file onto a fresh NNX model
    pm = _peft_vera(arch, tmp_path / "peft", r=8, target_modules=E2E["llama"],
                    projection_prng_key=11)
    loaded = model()
    found = lnnx.load_peft(tmp_path / "peft", loaded, model_type="llama")
    assert set(found.target_modules) == set(config.target_modules)
    assert found.replace(target_modules=config.target_modules) == config
    assert max_diff(loaded(**ids), torch_out(pm, ids)) <= E2E_TOL


# --- counting, bias="vera_only" and files without projections --------------------------------

def _counts(name, scan, **fields):
    """(ours, peft's) (trainable, total) counts for VeRA with `fields` on the tiny `name`."""
    from parity_harness import ARCHS, quiet
    from peft_checks import base_params

    import lora_jax

    arch = ARCHS[name]
    with quiet():
        theirs = peft.get_peft_model(arch.hf(), peft.VeraConfig(**fields))
    model, base = base_params(arch.module, arch.hf(), scan_layers=scan, build_kwargs=arch.task,
                              load_kwargs=arch.task)
    config = VeraConfig(**fields)
    layouts = lora_jax.layouts(model, **arch.inputs) if scan else None
    params = lora_jax.inject(base, config, jax.random.key(0), layouts=layouts)
    return lora_jax.count_parameters(params, config), theirs.get_nb_trainable_parameters()


def test_counts_are_peft_s():
    """The total leaves out the frozen projection slices (buffers in peft, no parameters)."""
    ours, theirs = _counts("llama", False, r=8, target_modules=["q_proj", "down_proj"])
    assert ours == theirs


def test_trainable_count_with_layers_to_transform_on_a_scanned_stack():
    ours, theirs = _counts("llama", True, r=8, target_modules=["q_proj", "down_proj"],
                           layers_to_transform=[1])
    assert ours == theirs


def test_bias_vera_only_trains_and_saves_the_biases_of_adapted_modules(tmp_path):
    from parity_harness import ARCHS, quiet
    from peft_checks import base_params, read_adapter

    import lora_jax

    fields = dict(r=8, target_modules=["query"], bias="vera_only")
    ours, theirs = _counts("bert", False, **fields)
    assert ours == theirs
    arch = ARCHS["bert"]
    _, base = base_params(arch.module, arch.hf(), build_kwargs=arch.task, load_kwargs=arch.task)
    config = VeraConfig(**fields)
    params = lora_jax.inject(base, config, jax.random.key(0))
    trainable, _ = lora_jax.split(params, config)
    query = trainable["bert"]["encoder"]["layer_0"]["attention"]["self"]["query"]
    assert query["bias"] is not None
    lora_jax.save_peft(tmp_path / "ours", params, config, model_type="bert")
    with quiet():
        peft.get_peft_model(arch.hf(), peft.VeraConfig(**fields)).save_pretrained(
            tmp_path / "peft")
    biases = [{k for k in read_adapter(tmp_path / d)[0] if k.endswith("bias")}
              for d in ("ours", "peft")]
    assert biases[0] == biases[1] and len(biases[0]) == 2


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.full)])
def test_a_file_saved_without_projections_loads_as_peft_loads_it(tmp_path, scan):
    """save_projection=False: load_peft draws the projections from projection_prng_key (sized
    by the targeted layers, as peft draws them on load): peft's logits and counts."""
    from parity_harness import ARCHS, _close
    from peft_checks import base_params, torch_out

    import lora_jax

    arch = ARCHS["llama"]
    pm = _peft_vera(arch, tmp_path, r=8, target_modules=["q_proj", "down_proj"],
                    save_projection=False, projection_prng_key=5)
    assert "base_model.vera_A" not in load_file(os.path.join(tmp_path,
                                                             "adapter_model.safetensors"))
    model, base = base_params(arch.module, arch.hf(), scan_layers=scan)
    params, config = lora_jax.load_peft(tmp_path, base, model_type="llama")
    assert not config.save_projection and config.projection_prng_key == 5
    ours = lora_jax.wrap(model.apply, config)({"params": params}, **arch.inputs)
    with torch.no_grad():
        theirs = torch_out(pm, arch.inputs)
    assert _close(np.asarray(model.apply({"params": base}, **arch.inputs)), theirs, arch) > \
        100 * E2E_TOL
    assert _close(np.asarray(ours), theirs, arch) <= E2E_TOL
    assert lora_jax.count_parameters(params, config) == pm.get_nb_trainable_parameters()


def test_saved_without_projections_peft_draws_ours(tmp_path):
    """save_projection=False: peft loads the file with projections it draws from the key, which
    are ours bit for bit; projections that are not the key's are refused."""
    from parity_harness import ARCHS, quiet
    from peft_checks import base_params

    import lora_jax

    arch = ARCHS["llama"]
    config = VeraConfig(r=8, target_modules=["q_proj", "down_proj"], save_projection=False,
                        projection_prng_key=3)
    _, base = base_params(arch.module, arch.hf())
    params = lora_jax.inject(base, config, jax.random.key(0))
    lora_jax.save_peft(tmp_path, params, config, model_type="llama")
    assert set(load_file(os.path.join(tmp_path, "adapter_model.safetensors"))) == {
        f"base_model.model.model.layers.{i}.{m}.vera_lambda_{v}" for i in (0, 1)
        for m in ("self_attn.q_proj", "mlp.down_proj") for v in "bd"}
    with quiet():
        pm = peft.PeftModel.from_pretrained(arch.hf(), tmp_path)
    layer = params["model"]["layers_0"]["mlp"]["down_proj"]
    np.testing.assert_array_equal(_numpy(pm.base_model.vera_A["default"]).T, layer["vera_A"])
    np.testing.assert_array_equal(_numpy(pm.base_model.vera_B["default"]).T[:, :32],
                                  layer["vera_B"])
    with pytest.raises(ValueError, match="not those of projection_prng_key=4"):
        lora_jax.save_peft(tmp_path / "other", params, dataclasses.replace(
            config, projection_prng_key=4), model_type="llama")
