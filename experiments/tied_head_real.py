"""transformers' real Flax GPT-2 (`FlaxGPT2LMHeadModel`, transformers 4.57.6, tiny and random)
ties its head as `lm_head.apply({"params": {"kernel": wte.embedding.T}}, h)`: with `wte` adapted,
`wrap` must warn that the merged model's head differs (peft's behaviour), and with `wte` left
alone it must not warn and wrapped == merged.

transformers 5 has no Flax models; put 4.57.6 first on the path (no venv needed):

    pip download --no-deps -d /tmp/wheels transformers==4.57.6 tokenizers==0.22.2 \
        huggingface-hub==0.36.2
    pip install --no-deps --no-index --find-links /tmp/wheels --target /tmp/tf4 \
        transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2
    PYTHONPATH=/tmp/tf4:. python experiments/tied_head_real.py

Results: experiments/results/tied_head_real.json.
"""

from __future__ import annotations

import json
import warnings
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from transformers import FlaxGPT2LMHeadModel, GPT2Config

import lora_jax


def main() -> None:
    config_hf = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                           initializer_range=0.2)
    hf = FlaxGPT2LMHeadModel(config_hf, seed=0)
    module, base = hf.module, hf.params
    ids = jnp.array([[1, 5, 7, 9]])
    inputs = (ids, jnp.ones_like(ids), jnp.arange(4)[None])
    logits = lambda fn, p: np.asarray(fn({"params": p}, *inputs, deterministic=True).logits)
    layouts = lora_jax.layouts(module, *inputs, deterministic=True)
    result: dict[str, object] = {"versions": {p: metadata.version(p) for p in
                                              ("transformers", "jax", "flax")}}
    for targets in (["c_attn", "wte"], ["c_attn"]):
        config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                     init_lora_weights=False)
        params = lora_jax.inject(base, config, jax.random.key(1), layouts=layouts)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wrapped = logits(lora_jax.wrap(module.apply, config), params)
        merged = logits(module.apply, lora_jax.merge(params, config))
        result["+".join(targets)] = {
            "tied_head_warnings": [str(w.message) for w in caught
                                   if "tied output head" in str(w.message)],
            "wrapped_vs_merged_max_abs": float(np.abs(wrapped - merged).max())}
    out = Path(__file__).parent / "results" / "tied_head_real.json"
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
