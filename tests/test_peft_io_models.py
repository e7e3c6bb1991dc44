"""peft <-> lora_jax for the other reference models: BERT (modules_to_save classifier, biases,
file equality), Llama (rank/alpha patterns), BLOOM (fused query_key_value), T5 (encoder and
decoder). Both directions: peft -> lora_jax (load_peft) and lora_jax -> peft (train in JAX,
save_peft, PeftModel.from_pretrained: logits, and merge_and_unload against lora_jax.merge).
Real peft on tiny random HF models; float32, max abs diff of logits <= peft_checks.TOL, of
merged weights <= MERGE_TOL."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from peft_checks import (
    TOL,
    assert_same_files,
    base_params,
    jax_to_peft,
    load_peft,
    max_diff,
    peft_adapter,
    peft_to_jax,
    read_adapter,
    save_peft,
    tiny_hf,
    torch_out,
)

import lora_jax
from lora_jax.models import bert, bloom, llama, t5

IDS = np.random.RandomState(1).randint(0, 99, (2, 8))
MASK = np.array([[1] * 8, [1] * 5 + [0] * 3])
MERGE_TOL = 1e-5  # float32 merged weights, lora_jax.merge against peft's merge_and_unload


def bert_hf() -> transformers.BertForSequenceClassification:
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=3,
                                     initializer_range=0.2)
    return tiny_hf(transformers.BertForSequenceClassification, config)


def llama_hf() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      initializer_range=0.2, tie_word_embeddings=False)
    return tiny_hf(transformers.LlamaForCausalLM, config)


def bloom_hf() -> transformers.BloomForCausalLM:
    config = transformers.BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4,
                                      initializer_range=0.2)
    return tiny_hf(transformers.BloomForCausalLM, config)


def t5_hf() -> transformers.T5ForConditionalGeneration:
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)
    return tiny_hf(transformers.T5ForConditionalGeneration, config)


def token_loss(targets: np.ndarray):
    """Cross-entropy of logits[:, :T] against `targets` [B, T] (next token: ids[:, 1:])."""
    def loss(logits: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(logits[:, : targets.shape[1]])
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()

    return loss


BERT_LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                 modules_to_save=["classifier"], task_type="SEQ_CLS")
# task_type alone: peft's PeftModelForSequenceClassification adds classifier and score.
BERT_TASK = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


def test_bert_peft_to_jax(tmp_path):
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    for bias, scan, lora in (("none", False, BERT_LORA), ("all", True, BERT_TASK)):
        hf = bert_hf()
        model, base = base_params(bert, hf, scan_layers=scan, build_kwargs={"task": "classify"},
                                  load_kwargs={"task": "classify"})
        path = str(tmp_path / bias)
        pm = peft_adapter(hf, path, bias=bias, **lora)
        diff = peft_to_jax(bert, model, base, pm, path, inputs, model_type="bert")
        assert diff <= TOL, (bias, scan, diff)
        params, config = load_peft(path, base, model_type="bert")
        assert config.modules_to_save == ("classifier", "score")
        assert config.task_type == "SEQ_CLS"
        trained = pm.base_model.model.classifier.modules_to_save["default"].weight.detach()
        assert max_diff(params["classifier"]["kernel"], trained.numpy().T) == 0
        print(f"bert bias={bias} scan={scan} peft->jax max diff {diff:.2e}")


def test_bert_files_match_what_peft_writes(tmp_path):
    hf = bert_hf()
    _, base = base_params(bert, hf, build_kwargs={"task": "classify"},
                          load_kwargs={"task": "classify"})
    lora = {k: v for k, v in BERT_LORA.items() if k != "task_type"}
    peft_adapter(hf, str(tmp_path / "peft"), bias="lora_only", **BERT_LORA)
    config = lora_jax.LoraConfig(bias="lora_only", **lora)
    params = lora_jax.inject(base, config, jax.random.key(0))
    save_peft(tmp_path / "ours", params, config, model_type="bert", task_type="SEQ_CLS")
    assert_same_files(str(tmp_path / "ours"), str(tmp_path / "peft"))
    tensors, _, fields = read_adapter(str(tmp_path / "ours"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias",
            "base_model.model.bert.encoder.layer.1.attention.self.value.base_layer.bias"
            } <= set(tensors)
    assert fields["modules_to_save"] == ["classifier", "classifier", "score"]


def test_llama_peft_to_jax_with_rank_pattern(tmp_path):
    hf = llama_hf()
    model, base = base_params(llama, hf)
    pm = peft_adapter(hf, str(tmp_path), r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                      rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 4},
                      task_type="CAUSAL_LM")
    diff = peft_to_jax(llama, model, base, pm, str(tmp_path), {"input_ids": IDS},
                       model_type="llama")
    assert diff <= TOL
    params, config = load_peft(tmp_path, base, model_type="llama")
    assert params["model"]["layers_0"]["self_attn"]["v_proj"]["lora_A"].shape == (32, 2)
    assert config.scaling("model.layers_1.self_attn.q_proj") == 1.0
    print(f"llama peft->jax max diff {diff:.2e}")


@pytest.mark.parametrize("lora, task_type", [
    ({k: v for k, v in BERT_LORA.items() if k != "task_type"}, "SEQ_CLS"),  # save_peft's argument
    (BERT_TASK, None),  # the config's task_type alone trains and saves the classifier
])
def test_bert_jax_to_peft_with_trained_classifier(tmp_path, lora, task_type):
    import peft

    config = lora_jax.LoraConfig(**lora)
    loss = token_loss(np.array([[0], [2]]))  # one label per sequence: logits [B, 3] as [B, 1, 3]
    task = {"task": "classify"}
    params, logits_diff, merge_diff = jax_to_peft(
        bert, bert_hf, config, lambda logits: loss(logits[:, None]),
        {"input_ids": IDS, "attention_mask": MASK}, str(tmp_path), task_type=task_type,
        build_kwargs=task, load_kwargs=task)
    base_kernel = bert_hf().classifier.weight.detach().numpy().T
    assert max_diff(params["classifier"]["kernel"], base_kernel) > 0
    expected = peft.get_peft_model(bert_hf(), peft.LoraConfig(
        **copy.deepcopy({**lora, "task_type": "SEQ_CLS"}))).get_nb_trainable_parameters()
    counted = lora_jax.count_parameters(params, config.replace(task_type="SEQ_CLS"))
    assert counted == expected, (counted, expected)
    _, _, fields = read_adapter(str(tmp_path))
    assert fields["task_type"] == "SEQ_CLS"
    assert logits_diff <= TOL and merge_diff <= MERGE_TOL, (logits_diff, merge_diff)
    print(f"bert jax->peft logits diff {logits_diff:.2e}, merge diff {merge_diff:.2e}, "
          f"params {counted} (peft {expected})")


@pytest.mark.parametrize("task_type", [
    "TOKEN_CLS",
    pytest.param("QUESTION_ANS", marks=pytest.mark.full),
    pytest.param("FEATURE_EXTRACTION", marks=pytest.mark.full),
])
def test_task_type_on_a_model_without_its_heads_writes_peft_s_file(tmp_path, task_type):
    """A BertModel has no classifier / score / qa_outputs: peft wraps none, and neither errs."""
    hf = tiny_hf(transformers.BertModel, bert_hf().config)
    _, base = base_params(bert, hf)
    pm = peft_adapter(hf, str(tmp_path / "peft"), r=4, target_modules=["query"],
                      task_type=task_type)
    config = lora_jax.LoraConfig(r=4, target_modules=["query"], task_type=task_type)
    params = lora_jax.inject(base, config, jax.random.key(0))
    assert lora_jax.count_parameters(params, config) == pm.get_nb_trainable_parameters()
    save_peft(tmp_path / "ours", params, config, model_type="bert")
    assert_same_files(str(tmp_path / "ours"), str(tmp_path / "peft"))
    assert read_adapter(str(tmp_path / "ours"))[2]["task_type"] == task_type
    _, loaded = load_peft(tmp_path / "peft", base, model_type="bert")
    assert loaded == config


# lora_jax -> peft: (architecture, HF model, LoraConfig fields, inputs, loss targets, task_type,
# scan_layers). BLOOM trains a scanned stack, which save_peft splits into per-layer tensors.
JAX_TO_PEFT = {
    "llama": (llama, llama_hf,
              dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 4}),
              {"input_ids": IDS}, IDS[:, 1:], "CAUSAL_LM", False),
    "bloom": (bloom, bloom_hf,
              dict(r=4, lora_alpha=8, target_modules=["query_key_value"], bias="lora_only"),
              {"input_ids": IDS, "attention_mask": np.ones_like(MASK)}, IDS[:, 1:], "CAUSAL_LM",
              True),
    "t5": (t5, t5_hf, dict(r=4, lora_alpha=8, target_modules=["q", "v"]),
           {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]}, IDS[:, 1:6], "SEQ_2_SEQ_LM",
           False),
}


@pytest.mark.parametrize("name", JAX_TO_PEFT)
def test_jax_to_peft_logits_and_merge(tmp_path, name):
    arch, hf_model, lora, inputs, targets, task_type, scan = JAX_TO_PEFT[name]
    config = lora_jax.LoraConfig(**lora, task_type=task_type)  # the file records it
    _, logits_diff, merge_diff = jax_to_peft(arch, hf_model, config, token_loss(targets), inputs,
                                             str(tmp_path), scan_layers=scan)
    # The config is written as given (its names match the PyTorch paths), not as explicit paths.
    _, _, fields = read_adapter(str(tmp_path))
    assert fields["task_type"] == task_type
    assert sorted(fields["target_modules"]) == sorted(lora["target_modules"])
    assert fields["rank_pattern"] == lora.get("rank_pattern", {})
    assert fields["alpha_pattern"] == lora.get("alpha_pattern", {})
    assert logits_diff <= TOL and merge_diff <= MERGE_TOL, (logits_diff, merge_diff)
    print(f"{name} jax->peft logits diff {logits_diff:.2e}, merge diff {merge_diff:.2e}")


def test_bloom_peft_to_jax_query_key_value(tmp_path):
    hf = bloom_hf()
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    for scan in (False, True):
        model, base = base_params(bloom, hf, scan_layers=scan)
        path = str(tmp_path / str(scan))
        pm = peft_adapter(copy.deepcopy(hf), path, r=4, lora_alpha=8,
                          target_modules=["query_key_value"], bias="lora_only",
                          task_type="CAUSAL_LM")
        params, lora = load_peft(path, base, model_type="bloom")
        ours = lora_jax.wrap(model.apply, lora)({"params": params}, **inputs)
        diff = max_diff(np.asarray(ours)[MASK == 1], torch_out(pm, inputs)[MASK == 1])
        assert diff <= TOL, (scan, diff)
        print(f"bloom scan={scan} peft->jax max diff {diff:.2e} (unpadded positions)")


def test_t5_peft_to_jax_encoder_and_decoder(tmp_path):
    hf = t5_hf()
    model, base = base_params(t5, hf)
    pm = peft_adapter(hf, str(tmp_path), r=4, lora_alpha=8, target_modules=["q", "v"],
                      task_type="SEQ_2_SEQ_LM")
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS[:, :5]}
    diff = peft_to_jax(t5, model, base, pm, str(tmp_path), inputs, model_type="t5")
    assert diff <= TOL
    params, _ = load_peft(tmp_path, base, model_type="t5")
    attn = params["decoder"]["block_1"]["layer_1"]["EncDecAttention"]
    assert attn["q"]["lora_A"].shape == (32, 4) and "lora_A" not in attn["k"]
    print(f"t5 peft->jax max diff {diff:.2e}")
