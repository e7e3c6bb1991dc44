"""The real `gemma` package's Gemma 3 transformer (`gm.nn.Transformer`, the class behind
`gm.nn.Gemma3_1B`, with its `nn.jit`-decorated `__call__` and its modules' `__getattr__`) at a tiny
random size: `layouts` twice, `wrap` == `merge`, the adapter changes the logits, and lora_jax's
wrapped model against gemma's own LoRA (`gm.nn.LoRA`) given the same factors.

gemma 4.0.1 needs Python >= 3.12; run with a venv that has it (and lora_jax on PYTHONPATH):

    python3.12 -m venv /tmp/gemma-venv && /tmp/gemma-venv/bin/pip install gemma==4.0.1 \
        'jax[cpu]' 'protobuf>=7.36'
    PYTHONPATH=. /tmp/gemma-venv/bin/python experiments/gemma3_real.py

Results: experiments/results/gemma3_real.json.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gemma import gm

import lora_jax
from lora_jax.core.record import iter_records

sys.path.insert(0, str(Path(__file__).parent))
import real_layers  # noqa: E402  (gm.nn.LoRA given lora_jax's factors)


def main() -> None:
    tiny = dataclasses.replace(
        gm.nn.Gemma3_1B.config, num_embed=128, embed_dim=32, hidden_dim=64, num_heads=2,
        head_dim=16, num_kv_heads=1, sliding_window_size=4,
        attention_types=(gm.nn.config.AttentionType.LOCAL_SLIDING,
                         gm.nn.config.AttentionType.GLOBAL))
    model = gm.nn.Transformer(config=tiny, dtype=jnp.float32)
    tokens = jnp.array([[2, 17, 5, 99, 33, 8, 61, 4]])
    base = model.init(jax.random.key(0), tokens)["params"]
    first, second = lora_jax.layouts(model, tokens), lora_jax.layouts(model, tokens)
    config = lora_jax.LoraConfig(r=real_layers.R, lora_alpha=real_layers.ALPHA,
                                 target_modules=real_layers.GEMMA_TARGETS,
                                 init_lora_weights=False)
    params = lora_jax.inject(base, config, jax.random.key(1), layouts=first)
    logits = lambda out: np.asarray(out.logits, np.float64)
    plain = logits(model.apply({"params": base}, tokens))
    model.apply({"params": params}, tokens)  # nn.jit caches a trace without the LoRA first
    wrapped = logits(lora_jax.wrap(model.apply, config)({"params": params}, tokens))
    merged = logits(model.apply({"params": lora_jax.merge(params, config)}, tokens))
    roles = {f"{i.path}.{i.record.weight}": i.record.layout.roles(i.weight.ndim)
             for i in iter_records(params)}
    # real_layers compares raw outputs: gemma's Output holds the logits.
    diff, peak = real_layers._max_diff, real_layers._max_abs
    seen = []  # (gemma's LoRA, lora_jax wrapped) logits, as compared

    def compare(x: object, y: object) -> float:
        seen.append((getattr(x, "logits", x), getattr(y, "logits", y)))
        return diff(*seen[-1])

    real_layers._max_diff = compare
    real_layers._max_abs = lambda x: peak(getattr(x, "logits", x))
    against = real_layers._against_gemma_lora(model, base, params, roles, tokens)
    result = {
        "model": "gm.nn.Transformer (Gemma3_1B's config, tiny: 2 layers, d=32, vocab 128)",
        "layouts_first_call": len(first), "layouts_second_call": len(second),
        "layouts_equal": first == second, "adapted_weights": len(roles), "roles": roles,
        "wrapped_vs_plain_max_abs": float(np.abs(wrapped - plain).max()),
        "wrapped_vs_merged_rel": float(np.abs(wrapped - merged).max() / np.abs(wrapped).max()),
        **against,
        "gemma_lora_vs_plain_max_abs": diff(seen[-1][0], plain),  # gm.nn.LoRA applied them
        "versions": {"python": platform.python_version(),
                     **{p: metadata.version(p) for p in ("jax", "flax", "gemma")}},
    }
    out = Path(__file__).parent / "results" / "gemma3_real.json"
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "roles"}, indent=2))


if __name__ == "__main__":
    main()
