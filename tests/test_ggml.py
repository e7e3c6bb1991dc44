"""GGML block formats kept as the frozen base (lora_jax.quant.ggml), checked against the `gguf`
package (llama.cpp's own Python reader: its quantize / dequantize are the oracle), and a tiny
random Llama written as a GGUF file with those blocks: loading it with `quantize="gguf"` gives
the same model as loading it in float, LoRA trains on it exactly as on the float base, and
NF4 on load equals `lora_jax.quantize` after a float load, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from tiny_gguf import K_PROJECTIONS, PROJECTIONS, random_blocks, write_tiny_gguf

import lora_jax
from lora_jax.models import gguf, llama
from lora_jax.quant import ggml

KINDS = sorted(ggml.FORMATS)


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_dequantize_as_the_gguf_package(kind):
    shape = (3, 24, 512)
    raw = random_blocks(kind, shape)
    theirs = quants.dequantize(raw, GGMLQuantizationType[kind])
    assert theirs.shape == shape and np.isfinite(theirs).all()
    ours = ggml.from_gguf(raw, kind, shape)
    np.testing.assert_array_equal(jnp.asarray(ours), theirs)  # the same float32 arithmetic
    assert ours.codes.shape == shape
    fmt = ggml.FORMATS[kind]
    assert ours.scale.shape == (3, 24, 512 // fmt.block)
    assert (ours.minimum is not None) == fmt.has_minimum
    # Bits a weight as stored (README): uint4 codes are half a byte.
    bits = sum(8 * (x.size / 2 if x.dtype == jnp.uint4 else x.nbytes)
               for x in jax.tree.leaves(ours)) / ours.size
    assert bits == {"Q4_0": 4.5, "Q4_1": 5.0, "Q8_0": 8.5, "Q4_K": 4.625, "Q5_K": 8.625,
                    "Q6_K": 8.5625}[kind]
    # As a flax kernel: the matrix transposed, blocks now along the rows.
    matrix = ggml.from_gguf(raw[0], kind, shape[1:])
    np.testing.assert_array_equal(jnp.asarray(matrix.T), theirs[0].T)
    assert matrix.T.scale.shape == (512 // fmt.block, 24) and matrix.T.T.axis == -1


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_the_gguf_package_quantizations_read_back(kind):
    w = np.random.default_rng(0).normal(size=(24, 96)).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType[kind])
    ours = jnp.asarray(ggml.from_gguf(raw, kind, w.shape))
    np.testing.assert_array_equal(ours, quants.dequantize(raw, GGMLQuantizationType[kind]))
    bound = {"Q8_0": 0.02, "Q4_0": 0.3, "Q4_1": 0.2}[kind] * np.abs(w).max()
    assert np.abs(ours - w).max() < bound  # a quantization of w at all


def test_bad_blocks_are_refused():
    with pytest.raises(ValueError, match="Q3_K cannot be kept quantized"):
        ggml.from_gguf(np.zeros((2, 110), np.uint8), "Q3_K", (2, 256))
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml.from_gguf(np.zeros((2, 144), np.uint8), "Q4_K", (2, 128))
    with pytest.raises(ValueError, match="multiple of 32"):
        ggml.from_gguf(np.zeros((2, 34), np.uint8), "Q8_0", (2, 40))
    with pytest.raises(ValueError, match="2-axis"):
        _ = ggml.from_gguf(np.zeros((2, 2, 34), np.uint8), "Q8_0", (2, 2, 32)).T


IDS = jnp.array([[3, 17, 42, 5, 88, 61, 9, 30]])


@pytest.fixture(scope="module")
def tiny_k_gguf(tmp_path_factory):
    """The tiny Llama at width 256 with its projections in Q4_K / Q5_K / Q6_K."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny_k.gguf", K_PROJECTIONS,
                           hidden=256, ffn=512)


@pytest.mark.parametrize("formats, scan", [("classic", False), ("classic", True), ("k", True)])
def test_a_file_loads_in_its_own_blocks(request, formats, scan):
    path, kinds = (request.getfixturevalue("tiny_gguf"), PROJECTIONS) if formats == "classic" \
        else (request.getfixturevalue("tiny_k_gguf"), K_PROJECTIONS)
    module, floats, _, _ = gguf.load_gguf(path, scan_layers=scan)
    module_q, blocks, _, _ = gguf.load_gguf(path, scan_layers=scan, quantize="gguf")
    layers = blocks["model"]["layers" if scan else "layers_0"]
    for name, projection in [("self_attn", "q_proj"), ("self_attn", "k_proj"),
                             ("self_attn", "v_proj"), ("mlp", "down_proj")]:
        kernel = layers[name][projection]["kernel"]
        gguf_name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                     "down_proj": "ffn_down"}[projection]
        assert isinstance(kernel, ggml.GGMLTensor) and kernel.kind == kinds[gguf_name]
        assert kernel.axis == -2  # blocks along the kernel's input axis
    assert not lora_jax.quant.quantize.is_quantized(blocks["model"]["embed_tokens"]["embedding"])
    # The q/k rows un-permuted in the blocks exactly as in the float tensors.
    for x, y in zip(jax.tree.leaves(lora_jax.dequantize(blocks)), jax.tree.leaves(floats),
                    strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(module_q.apply({"params": blocks}, IDS),
                                  module.apply({"params": floats}, IDS))


def test_lora_on_the_file_blocks_trains_as_on_the_float_base(tiny_gguf):
    module, blocks, _, _ = gguf.load_gguf(tiny_gguf, quantize="gguf")
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                 init_lora_weights=False)  # B != 0: the delta counts
    params = lora_jax.inject(blocks, config, jax.random.key(0),
                             layouts=lora_jax.layouts(module, IDS))
    apply = lora_jax.wrap(module.apply, config)
    trainable, frozen = lora_jax.split(params, config)
    assert not lora_jax.quant.quantize.has_quantized(trainable)

    def loss(trainable, frozen):
        logits = apply({"params": lora_jax.combine(trainable, frozen)}, IDS)
        return jax.nn.logsumexp(logits, -1).mean() - logits[..., 0].mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    value, grads = value_and_grad(trainable, frozen)
    value_f, grads_f = value_and_grad(trainable, lora_jax.dequantize(frozen))
    np.testing.assert_allclose(value, value_f, rtol=1e-5)
    for g, g_f in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_f), strict=True):
        np.testing.assert_allclose(g, g_f, rtol=1e-5, atol=1e-5 * float(jnp.abs(g_f).max()))
    # Merging gives a float base: the dequantized blocks plus the adapter's delta.
    merged = lora_jax.merge(params, config)
    assert not lora_jax.quant.quantize.has_quantized(merged)
    np.testing.assert_allclose(module.apply({"params": merged}, IDS),
                               apply({"params": params}, IDS), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantizing_on_load_equals_quantizing_after(tiny_gguf, kind):
    _, floats, _, _ = gguf.load_gguf(tiny_gguf, scan_layers=True, param_dtype=jnp.bfloat16)
    _, on_load, _, _ = gguf.load_gguf(tiny_gguf, scan_layers=True, param_dtype=jnp.bfloat16,
                                      quantize=kind)
    same = jax.tree.map(lambda x, y: x.dtype == y.dtype and bool((x == y).all()), on_load,
                        lora_jax.quantize(floats, kind))  # and the same tree structure
    assert all(jax.tree.leaves(same))


def test_the_file_blocks_shard_like_their_kernels(tiny_gguf):
    """8 simulated devices (data x fsdp x tensor) and Llama's SHARDING_RULES: codes, scales and
    minimums take the kernel's spec (whole blocks per shard), and the adapted forward equals
    one device's."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    from lora_jax.core.sharding import match_specs, shard_inject

    module, blocks, _, _ = gguf.load_gguf(tiny_gguf, scan_layers=True, quantize="gguf")
    config = lora_jax.LoraConfig(r=4, target_modules=["q_proj", "down_proj"])
    layouts = lora_jax.layouts(module, IDS)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    sharded = shard_inject(blocks, config, jax.random.key(1), mesh,
                           specs=match_specs(blocks, llama.SHARDING_RULES), layouts=layouts)
    single = lora_jax.inject(blocks, config, jax.random.key(1), layouts=layouts)
    q = sharded["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # Q4_1 [2, 64, 64]
    for field in (q.codes, q.scale, q.minimum):
        assert field.sharding.spec == P(None, "fsdp", "tensor")
    assert q.scale.addressable_shards[0].data.shape == (2, 1, 32)  # one row of blocks
    down = sharded["model"]["layers"]["mlp"]["down_proj"]["kernel"]  # Q8_0 [2, 128, 64]
    assert down.scale.sharding.spec == P(None, "tensor", "fsdp") and down.minimum is None
    apply = lora_jax.wrap(module.apply, config)
    np.testing.assert_allclose(jax.jit(apply)({"params": sharded}, IDS),
                               apply({"params": single}, IDS), rtol=1e-5, atol=1e-5)


def test_unsupported_blocks_and_bad_options_are_refused(tmp_path):
    odd = write_tiny_gguf(tmp_path / "q5.gguf", {**PROJECTIONS, "ffn_up": "Q5_0"})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight \(Q5_0\).*quantize='nf4'"):
        gguf.load_gguf(odd, quantize="gguf")
    gguf.load_gguf(odd)  # in float it loads
    with pytest.raises(ValueError, match="quantize must be None, 'gguf' or one of"):
        gguf.load_gguf(odd, quantize="q4")
    _, blocks, _, _ = gguf.load_gguf(write_tiny_gguf(tmp_path / "ok.gguf"), quantize="gguf")
    with pytest.raises(ValueError, match="already quantized"):  # the embedding is no kernel
        lora_jax.quantize(blocks)
    config = lora_jax.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="quantized"):
        lora_jax.inject(blocks, config, jax.random.key(0))
