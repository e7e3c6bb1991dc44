"""Instruction data (lora_jax.train.sft, lora_jax.train.chat) and packed sequences: the loss on
completions only equals transformers' own loss with the prompt's labels at -100; the assistant
mask of a chat template equals transformers' `return_assistant_tokens_mask`; packed rows give
the unpacked loss and gradients; bad lines are one-line errors naming the line."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_run import lora_jax_cli

from lora_jax.models import loading
from lora_jax.train import chat, sft
from lora_jax.train.data import TextDataset
from lora_jax.train.loop import task_loss

PAIRS = [("Translate to French: cat", "chat"), ("2 + 2 =", "4, as everyone knows"),
         ("Name a colour.", "blue"), ("Q: what is the capital of Italy? A:", "Rome"),
         ("Say nothing more than yes.", "yes"), ("Count to three:", "one two three")]
# A ChatML-like template with TRL's generation tags (transformers' assistant-mask oracle).
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n"
            "{% generation %}{{ m['content'] }}<|end|>\n{% endgeneration %}{% else %}"
            "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHATS = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4"}],
         [{"role": "user", "content": "Name a fruit"},
          {"role": "assistant", "content": "apple, or a pear"}]]


def _pairs() -> TextDataset:
    return TextDataset(tuple(p for p, _ in PAIRS), targets=tuple(c for _, c in PAIRS))


def _model(folder):
    module, params = loading.from_pretrained(folder)
    tokenizer = loading.load_tokenizer(folder)
    return module, params, tokenizer, tokenizer.token_to_id("[SEP]")


def _loss(module, params, arrays):
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    extra = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                          **extra)
    return task_loss("lm", logits, batch)


def test_completion_only_loss_equals_transformers_masked_loss(tiny_llama):
    import torch
    import transformers

    module, params, tokenizer, eos = _model(tiny_llama)
    arrays = sft.rows(sft.tokenize(tokenizer, _pairs(), eos), 24)
    ours = float(_loss(module, params, arrays))
    # The oracle: HF's tokenizer and model, labels -100 on the prompt and the padding.
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_llama /
                                                                     "tokenizer.json"))
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    ids, mask = np.zeros((len(PAIRS), 24), np.int64), np.zeros((len(PAIRS), 24), np.int64)
    labels = np.full((len(PAIRS), 24), -100, np.int64)
    for row, (prompt, completion) in enumerate(PAIRS):
        p = hf_tok(prompt, add_special_tokens=False)["input_ids"]
        c = hf_tok(completion, add_special_tokens=False)["input_ids"] + [eos]
        ids[row, :len(p) + len(c)] = p + c
        mask[row, :len(p) + len(c)] = 1
        labels[row, len(p):len(p) + len(c)] = c
    with torch.no_grad():
        theirs = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                       labels=torch.tensor(labels)).loss.item()
    np.testing.assert_array_equal(arrays["input_ids"], ids)
    assert abs(ours - theirs) <= 1e-5 * abs(theirs), (ours, theirs)
    # Completion-only differs from the loss over every token (the mask matters).
    full = float(_loss(module, params, {k: v for k, v in arrays.items() if k != "loss_mask"}))
    assert abs(full - ours) > 1e-3


def _folder_with_template(src, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(src, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "eos_token": "[SEP]", "bos_token": "[CLS]"}))
    return folder


def test_chat_mask_equals_transformers_assistant_mask(tiny_llama, tmp_path):
    import transformers

    folder = _folder_with_template(tiny_llama, tmp_path)
    template = chat.read_chat_template(folder)
    tokenizer = loading.load_tokenizer(folder)
    eos = tokenizer.token_to_id("[SEP]")
    data = TextDataset((), messages=tuple(tuple(c) for c in CHATS))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                  chat_template=TEMPLATE)
    for conversation, (ids, trained) in zip(CHATS, sft.tokenize(tokenizer, data, eos, template),
                                            strict=True):
        assert "".join(t for t, _ in template.pieces(conversation)) == hf_tok.apply_chat_template(
            conversation, tokenize=False)
        hf = hf_tok.apply_chat_template(conversation, return_dict=True,
                                        return_assistant_tokens_mask=True)
        # Ours: the template's tokens, then EOS (trained) as the template ends turns otherwise.
        assert ids[:-1].tolist() == hf["input_ids"] and ids[-1] == eos
        assert trained[:-1].tolist() == hf["assistant_masks"] and trained[-1] == 1
        assert sum(hf["assistant_masks"]) > 0 and not all(hf["assistant_masks"])


def test_smollm2_template_renders_as_transformers_renders_it():
    """The real chat template of SmolLM2-135M-Instruct (GGUF metadata; it adds a default system
    turn): our render equals transformers' `apply_chat_template`, and the pieces join to it."""
    import tokenizers
    import transformers
    from gguf import GGUFReader

    from lora_jax.models.gguf import smollm2_path

    source = GGUFReader(smollm2_path()).fields["tokenizer.chat_template"].contents()
    template = chat.ChatTemplate(source)
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=words, chat_template=source)
    for conversation in CHATS:
        for prompt in (False, True):
            assert template.render(conversation, prompt) == tok.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=prompt)
        pieces = template.pieces(conversation)
        assert "".join(t for t, _ in pieces) == template.render(conversation)
        assert [t for t, trained in pieces if trained] == [
            m["content"] + "<|im_end|>\n" for m in conversation if m["role"] == "assistant"]


def _packed_equals_unpacked(folder):
    module, params, tokenizer, eos = _model(folder)
    examples = sft.tokenize(tokenizer, _pairs(), eos)
    unpacked, packed = sft.rows(examples, 32), sft.pack(examples, 32)
    assert len(packed["input_ids"]) < len(unpacked["input_ids"])
    assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum()
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, x: _loss(module, p, x)))
    (a, grad_a), (b, grad_b) = (loss_and_grad(params, x) for x in (unpacked, packed))
    assert abs(float(a) - float(b)) <= 1e-5 * abs(float(a)), (float(a), float(b))
    for g, h in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b), strict=True):
        np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-5 * float(jnp.abs(g).max()) + 1e-9)


def test_packed_loss_equals_unpacked_llama(tiny_llama):
    _packed_equals_unpacked(tiny_llama)


@pytest.mark.full
@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_bloom"])
def test_packed_loss_equals_unpacked_other_families(family, request):
    _packed_equals_unpacked(request.getfixturevalue(family))


def test_pack_fills_rows_first_fit_and_truncates():
    examples = [(np.arange(n, dtype=np.int32) + 10, np.ones(n, np.int32)) for n in (5, 3, 9, 2)]
    packed = sft.pack(examples, 8)
    assert packed["segment_ids"].tolist() == [[1] * 5 + [2] * 3, [1] * 8, [1, 1] + [0] * 6]
    assert packed["input_ids"][1].tolist() == list(range(10, 18))  # 9 tokens cut to 8
    assert packed["loss_mask"][0].tolist() == [0, 1, 1, 1, 1, 0, 1, 1]


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], ':2: expected an object with '
     'string "prompt" and "completion"'),
    (['{"prompt": "a", "completion": "  "}'], ":1: the completion is empty"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}'],
     ':1: message 1 has role "bot"; use one of system, user, assistant, tool'),
    (['{"messages": [{"role": "assistant", "content": "a"}]}', '{"messages": [{"role": '
      '"user", "content": "a"}]}'], ":2: no assistant message with content"),
    (['{"messages": [{"role": "assistant", "content": "a"}]}', "", '{"prompt": "a", '
      '"completion": "b"}'], ':3: expected an object with a non-empty "messages" list'),
    (['{"messages": [{"role": "user"}]}'], ':1: message 0 needs a string "role" and "content"'),
])
def test_bad_instruction_lines_are_one_line_errors(tmp_path, lines, message):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        sft.read_instructions(path)
    assert f"{path}{message}" in str(err.value) and "\n" not in str(err.value)


def test_finetune_packed_chat_run_matches_transformers(tiny_llama, tmp_path):
    """The CLI end to end on chat data, packed: its loss on the test split before training
    equals transformers' masked loss over the same examples, one by one."""
    import torch
    import transformers

    from lora_jax.train import data

    folder = _folder_with_template(tiny_llama, tmp_path)
    lines = [json.dumps({"messages": [{"role": "user", "content": f"question {i}"}, {
        "role": "assistant", "content": f"answer {i}" + " and more" * (i % 3)}]})
        for i in range(20)]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    code, stdout, stderr = lora_jax_cli(
        "finetune", "--model", folder, "--data", tmp_path / "chat.jsonl", "--packing",
        "--seq-len", 64, "--batch-size", 2, "--steps", 2, "--no-progress", "--out", out)
    assert code == 0 and "longer than --seq-len" not in stdout, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    test = data.split(data.load_dataset(str(tmp_path / "chat.jsonl"), "lm"), seed=0)[2]
    tokenizer = loading.load_tokenizer(folder)
    examples = sft.tokenize(tokenizer, test, tokenizer.token_to_id("[SEP]"),
                            chat.read_chat_template(folder))
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    total, count = 0.0, 0
    for ids, trained in examples:
        labels = np.where(trained == 1, ids, -100)
        labels[0] = -100
        n = int((labels[1:] != -100).sum())
        with torch.no_grad():
            loss = model(torch.tensor(ids[None].astype(np.int64)),
                         labels=torch.tensor(labels[None].astype(np.int64))).loss.item()
        total, count = total + loss * n, count + n
    assert metrics["test_before"]["tokens"] == count
    assert abs(metrics["test_before"]["loss"] - total / count) <= 1e-5 * total / count
    assert all(np.isfinite(metrics["losses"]))


@pytest.mark.parametrize("flags, message", [
    (["--data", "{text}"], "--packing packs instruction data"),
    (["--data", "{sft}", "--method", "prompt"], "--packing runs on the linen models"),
])
def test_packing_refused_where_it_does_not_apply(tiny_llama, tmp_path, flags, message):
    (tmp_path / "text.txt").write_text("some words\n\nmore words\n")
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    flags = [f.format(text=tmp_path / "text.txt", sft=tmp_path / "sft.jsonl") for f in flags]
    code, _, stderr = lora_jax_cli("finetune", "--model", tiny_llama, "--packing", *flags,
                                   "--out", tmp_path / "run")
    assert code == 2 and message in stderr, stderr
