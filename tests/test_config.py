"""LoraConfig: peft's defaults, scaling, and clear errors for bad fields."""

import math

import jax
import pytest

from lora_jax import LoraConfig


def test_defaults_match_peft():
    config = LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 8, 0.0, "none")
    assert config.init_lora_weights is True and config.use_rslora is False
    assert config.rank_pattern == {} and config.alpha_pattern == {}


def test_scaling_plain_rslora_and_patterns():
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4},
                        alpha_pattern={"v_proj": 32})
    assert config.scaling("layers_0.k_proj") == 2.0
    assert config.scaling("layers_0.q_proj") == 4.0  # 16 / 4
    assert config.scaling("layers_0.v_proj") == 4.0  # 32 / 8
    rs = LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert math.isclose(rs.scaling("x"), 8 / 4)


def test_hashable_and_usable_as_static_argument():
    config = LoraConfig(target_modules=["q", "v"], rank_pattern={"q": 4})
    assert hash(config) == hash(LoraConfig(target_modules=("q", "v"), rank_pattern={"q": 4}))
    f = jax.jit(lambda x, c: x * c.r, static_argnums=1)
    assert f(2.0, config) == 16.0


def test_dict_round_trip():
    config = LoraConfig(r=4, target_modules=["q"], layers_to_transform=[0, 2])
    assert LoraConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("task_type, given, saved", [
    ("SEQ_CLS", None, ("classifier", "score")),  # peft's PeftModelForSequenceClassification
    ("TOKEN_CLS", ["classifier"], ("classifier", "classifier", "score")),  # peft appends
    ("QUESTION_ANS", None, ("qa_outputs",)),
    ("CAUSAL_LM", ["lm_head"], ("lm_head",)),  # only labels the file
])
def test_task_type_appends_peft_s_heads_once(task_type, given, saved):
    config = LoraConfig(task_type=task_type, modules_to_save=given)
    assert config.modules_to_save == saved
    assert LoraConfig.from_dict(config.to_dict()) == config  # read back: no second append


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"r": -2}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\] must be a positive integer"),
        ({"lora_alpha": 0}, "lora_alpha must be a positive finite number, got 0"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a positive finite number, got nan"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a positive finite number, got inf"),
        ({"use_rslora": "no"}, "use_rslora must be True or False, got 'no'"),
        ({"lora_dropout": float("nan")}, r"lora_dropout must be in \[0, 1\), got nan"),
        ({"target_parameters": "w"}, "target_parameters must be a list of param names"),
        ({"alpha_pattern": {"q": -1}},
         r"alpha_pattern\['q'\] must be a positive finite number"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0"),
        ({"lora_dropout": -0.1}, "lora_dropout must be in"),
        ({"bias": "some"}, "bias must be 'none', 'all' or 'lora_only'"),
        ({"init_lora_weights": "svd"},
         "init_lora_weights must be True, False, 'gaussian', 'pissa'"),
        ({"layers_pattern": "h"}, "layers_pattern needs layers_to_transform"),
        ({"task_type": "seq_cls"}, r"task_type must be one of SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, "
         r"TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION or None \(peft's TaskType\), got 'seq_cls'"),
        ({"target_modules": ".*c_attn", "layers_to_transform": [0]},
         r"layers_to_transform cannot be used with a str \(regex or 'all-linear'\)"),
    ],
)
def test_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_misspelled_field_names_the_closest_field():
    with pytest.raises(TypeError, match=r"no field 'target_module' \(did you mean "
                                        r"'target_modules'\?\)"):
        LoraConfig(target_module=["q"])
    with pytest.raises(TypeError, match="'lora_alpa'.*'lora_alpha'"):
        LoraConfig.from_dict({"r": 4, "lora_alpa": 8})


def test_the_signature_is_the_dataclass_one():
    import inspect

    params = inspect.signature(LoraConfig).parameters
    assert list(params)[:3] == ["r", "lora_alpha", "target_modules"]
    assert params["r"].default == 8 and "target_parameters" in params
