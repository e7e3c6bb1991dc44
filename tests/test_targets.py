"""peft's target-matching rules on Flax paths, table-driven."""

import pytest

from lora_jax.core.targets import layer_index, matches, path_forms, pattern_value

GPT2 = "transformer.h_0.attn.c_attn"


@pytest.mark.parametrize(
    "spec, path, expected",
    [
        # A list matches equal names or "." + name suffixes.
        (["c_attn"], GPT2, True),
        (["attn.c_attn"], GPT2, True),
        (["h.0.attn.c_attn"], GPT2, True),  # peft's spelling of Flax's h_0
        (["h_0.attn.c_attn"], GPT2, True),
        (["attn"], GPT2, False),  # a parent's name is not a suffix of the layer's path
        (["_attn"], GPT2, False),  # suffix on "." boundaries only
        (["c_attn"], "transformer.h_0.attn.c_attn_extra", False),
        ([GPT2], GPT2, True),
        (["q", "v"], "encoder.block_0.layer_0.SelfAttention.q", True),
        (["q", "v"], "encoder.block_0.layer_0.SelfAttention.k", False),
        (["wi_0"], "decoder.block_1.layer_2.DenseReluDense.wi_0", True),  # a real "_0" name
        # A string is re.fullmatch-ed.
        (r".*\.c_attn", GPT2, True),
        ("c_attn", GPT2, False),  # fullmatch, not search
        (r".*encoder.*\.(q|v)", "encoder.block_0.layer_0.SelfAttention.q", True),
        (r".*encoder.*\.(q|v)", "decoder.block_0.layer_0.SelfAttention.q", False),
        (r".*\.h\.0\..*", GPT2, True),  # regexes see the peft spelling too
        (r".*\.h\.1\..*", GPT2, False),
    ],
)
def test_matches(spec, path, expected):
    assert matches(spec, path) is expected


def test_path_forms_reads_list_names_as_indices():
    assert path_forms("model.layers_12.mlp.up_proj") == (
        "model.layers_12.mlp.up_proj", "model.layers.12.mlp.up_proj")
    assert path_forms("lm_head") == ("lm_head",)


@pytest.mark.parametrize(
    "path, pattern, expected",
    [
        (GPT2, None, 0),
        ("model.layers_7.self_attn.q_proj", None, 7),
        ("model.layers_7.self_attn.q_proj", "layers", 7),
        ("model.layers_7.self_attn.q_proj", ["h", "layers"], 7),
        ("model.layers_7.self_attn.q_proj", "h", None),
        ("encoder.block_3.layer_1.EncDecAttention.q", "block", 3),
        # peft 0.21 reads the first index without a pattern (T5's block, not its layer_1).
        ("encoder.block_3.layer_1.EncDecAttention.q", None, 3),
        ("encoder.block_3.layer_1.DenseReluDense.wi_0", None, 3),
        ("transformer.h.attn.c_attn", None, None),  # a scanned stack has no index in its path
        ("lm_head", None, None),
    ],
)
def test_layer_index(path, pattern, expected):
    assert layer_index(path, pattern) == expected


@pytest.mark.parametrize(
    "patterns, path, expected",
    [
        ({"q_proj": 16}, "model.layers_0.self_attn.q_proj", 16),
        ({"q_proj": 16}, "model.layers_0.self_attn.v_proj", 8),
        ({r"layers\.0\.self_attn\.q_proj": 4}, "model.layers_0.self_attn.q_proj", 4),
        ({r"layers\.0\.self_attn\.q_proj": 4}, "model.layers_10.self_attn.q_proj", 8),
        ({"proj": 4}, "model.layers_0.self_attn.q_proj", 8),  # matches whole components only
        ({"v_proj": 2, ".*proj": 3}, "model.layers_0.self_attn.v_proj", 2),  # first key wins
    ],
)
def test_pattern_value(patterns, path, expected):
    assert pattern_value(patterns, path, 8) == expected
