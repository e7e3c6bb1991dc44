"""lora_jax.nnx on an NNX model nobody here wrote: tunix's Llama3 (`tunix.models.llama3.model`,
google-tunix 0.1.7), tiny and random, checked against transformers' LlamaForCausalLM with the
same weights (loaded by tunix's own safetensors loader) and peft.

Setup (no other dependencies are installed; tunix's package __init__ imports its trainers, so
the script imports only its model modules):

    pip download --no-deps google-tunix==0.1.7 jaxtyping wadler-lindig -d /tmp/nnx_trial/wheels
    pip install --no-deps --target /tmp/nnx_trial/site /tmp/nnx_trial/wheels/*.whl
    python experiments/nnx_trial.py --site /tmp/nnx_trial/site

Checks: inject (tunix's own `Einsum` q/k/v/o through lora_jax's shipped rule, its nnx.Linear
MLP through flax's), default init == base exactly, adapted == merged, 3 Adam steps with
nnx.Optimizer(wrt=nnx.LoRAParam) change only the factors, merge gives back plain tunix modules,
peft export (einsum kernels written as the HF Linear of their flattening) loaded by
PeftModel.from_pretrained onto the HF model: logits compared; that file loaded back onto a fresh
tunix model by lnnx.load_peft (peft's 2-D factors read into the einsum kernels' axes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

jax.config.update("jax_default_matmul_precision", "highest")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", default="/tmp/nnx_trial/site")
    parser.add_argument("--out", default="experiments/results/nnx_trial.json")
    args = parser.parse_args()
    sys.path.insert(0, args.site)
    tunix = types.ModuleType("tunix")  # skip tunix/__init__ (its trainers' dependencies)
    tunix.__path__ = [os.path.join(args.site, "tunix")]
    sys.modules["tunix"] = tunix
    import peft
    import torch
    import transformers
    from flax import nnx
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params

    import lora_jax
    import lora_jax.nnx.frontend as lnnx

    results: dict[str, object] = {"package": "google-tunix 0.1.7", "model": "Llama3"}
    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        rope_theta=1_000_000.0, rms_norm_eps=1e-5, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    config = llama3.ModelConfig(num_layers=2, vocab_size=128, embed_dim=64, hidden_dim=96,
                                num_heads=4, head_dim=16, num_kv_heads=2, rope_theta=1_000_000,
                                norm_eps=1e-5)
    work = tempfile.mkdtemp()
    hf.save_pretrained(os.path.join(work, "base"))
    model = llama3_params.create_model_from_safe_tensors(os.path.join(work, "base"), config)

    ids = np.random.RandomState(0).randint(0, 128, (2, 12))
    positions = jnp.broadcast_to(jnp.arange(12), ids.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((12, 12), bool)), (2, 12, 12))
    logits = lambda m: m(jnp.asarray(ids), positions, None, mask)[0]
    with torch.no_grad():
        hf_logits = hf(torch.tensor(ids)).logits.numpy()
    diff = lambda a, b: float(np.abs(np.asarray(a, np.float64) - np.asarray(b)).max())
    base = logits(model)
    results["tunix_vs_hf_base_logits_max_abs_diff"] = diff(base, hf_logits)

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    lnnx.inject(model, lora, nnx.Rngs(0))
    tree = lnnx.params(model)
    adapted = sorted(item.target for item in lora_jax.core.record.iter_records(tree))
    results["adapted"] = adapted
    results["adapted_classes"] = sorted({type(m).__name__ for _, m in nnx.iter_graph(model)
                                         if type(m).__name__.endswith("WithLoRA")})
    results["default_init_equals_base_exactly"] = bool(np.array_equal(logits(model), base))
    lnnx.print_trainable_parameters(model, lora)
    results["trainable, total"] = lnnx.count_parameters(model, lora)

    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(
            logits(m)[:, :-1], jnp.asarray(ids)[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    start = time.perf_counter()
    results["losses"] = [round(float(step(model, optimizer)), 5) for _ in range(3)]
    results["train_seconds_3_steps_with_compile"] = round(time.perf_counter() - start, 2)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    changed = {"/".join(str(k.key) for k in p)
               for p, a in jax.tree_util.tree_leaves_with_path(after)
               if not np.array_equal(a, _at(before, p))}
    results["changed_leaves_are_all_factors"] = bool(changed) and all(
        "_lora_" in c or "/lora_" in c for c in changed)
    results["n_changed_leaves"] = len(changed)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(optimizer.opt_state)))
    factor_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    results["optimizer_state_bytes, factor_bytes"] = (opt_bytes, factor_bytes)

    adapted_logits = logits(model)
    merged = lnnx.merge(model, lora)
    results["merged_has_no_lora_classes"] = not any(
        type(m).__name__.endswith("WithLoRA") for _, m in nnx.iter_graph(merged))
    results["adapted_vs_merged_rel"] = diff(logits(merged), adapted_logits) / float(
        np.abs(adapted_logits).max())

    path_map = lambda p: "model." + p.replace(".attn.", ".self_attn.").replace(
        "layers_", "layers.") if p.startswith("layers_") else None
    adapter = os.path.join(work, "adapter")
    lnnx.save_peft(adapter, model, lora, path_map=path_map)
    results["peft_keys"] = len(__import__("safetensors.numpy", fromlist=["x"]).load_file(
        os.path.join(adapter, "adapter_model.safetensors")))
    pm = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        peft_logits = pm(torch.tensor(ids)).logits.numpy()
    results["peft_vs_tunix_adapted_logits_max_abs_diff"] = diff(adapted_logits, peft_logits)
    results["adapter_changes_logits_by"] = diff(adapted_logits, base)
    # and back: peft's 2-D factors onto a fresh tunix model's einsum kernels [D, N, H] / [N, H, D]
    fresh = llama3_params.create_model_from_safe_tensors(os.path.join(work, "base"), config)
    lnnx.load_peft(adapter, fresh, path_map=path_map)
    results["peft_file_loaded_back_vs_tunix_adapted_logits_max_abs_diff"] = diff(
        logits(fresh), adapted_logits)
    results["loaded_back_q_proj_factor_shapes"] = [
        tuple(fresh.layers[0].attn.q_proj.w_lora_A.shape),
        tuple(fresh.layers[0].attn.q_proj.w_lora_B.shape)]
    for key, value in results.items():
        print(f"{key}: {value}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


if __name__ == "__main__":
    main()
