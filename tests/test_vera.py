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
    assert set(theirs) - set(ours) == {"fan_in_fan_out", "task_type", "peft_type", "auto_mapping",
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
