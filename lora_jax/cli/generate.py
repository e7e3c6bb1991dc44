"""`lora-jax generate`: continue prompts with a causal LM, or decode from them with an
encoder-decoder (T5); with one adapter, or one adapter per prompt (an adapter set: one batch,
one compiled decode loop)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_jax.cli.adapter import check_adapter
from lora_jax.cli.model import eos_id, load_model, max_positions
from lora_jax.core.config import AdapterConfig


def generate(args: argparse.Namespace) -> int:
    """`lora-jax generate` with the parsed flags; returns the exit status (0)."""
    import jax
    import jax.numpy as jnp

    import lora_jax
    from lora_jax.models.generate import generate as run_generate
    from lora_jax.models.generate import generate_seq2seq
    from lora_jax.peft.files import load_peft
    from lora_jax.train.data import unpadded_tokenizer  # no padding: only the prompt's tokens

    prompts, folders = args.prompt, args.adapter or []
    if len(folders) > 1 and len(folders) != len(prompts):
        raise ValueError(f"{len(folders)} --adapter flags for {len(prompts)} --prompt flags: give "
                         "one adapter, or one per prompt (--adapter none for the base alone)")
    for folder in folders:
        if folder != "none":
            check_adapter(Path(folder))
    loaded, task = load_model(args.model, "base", quantize=args.quantize)
    if task == "classify":
        raise ValueError(f"--model {args.model}: generate needs a causal LM or an "
                         f"encoder-decoder, this is a {loaded.model_type} encoder")
    params, apply = loaded.params, loaded.module.apply
    layouts = loaded.layouts()

    def load(folder: str) -> tuple[dict, AdapterConfig]:
        try:
            return load_peft(folder, params, model_type=loaded.model_type, layouts=layouts)
        except ValueError as err:  # which --adapter, when there are several
            raise ValueError(f"--adapter {folder}: {err}") from None

    adapter_ids = None
    if len(folders) > 1:
        if task == "seq2seq":
            raise ValueError("one adapter per prompt needs a causal LM; run an encoder-decoder "
                             "once per adapter")
        named = {f: load(f) for f in dict.fromkeys(folders) if f != "none"}
        try:
            aset = lora_jax.adapters.adapter_set(named)
        except ValueError as err:
            raise ValueError(f"one --adapter per prompt: {err}") from None
        params, apply = aset.params, lora_jax.wrap(apply, aset.configs[0])
        adapter_ids = aset.ids([None if f == "none" else f for f in folders])
    elif folders and folders[0] != "none":
        params, config = load(folders[0])
        apply = lora_jax.wrap(apply, config)

    # A causal LM continues the prompt's own tokens; an encoder reads them as training did.
    tokenizer = unpadded_tokenizer(loaded.tokenizer)
    encoded = [tokenizer.encode(p, add_special_tokens=task == "seq2seq").ids for p in prompts]
    for prompt, ids in zip(prompts, encoded, strict=True):
        if not prompt.strip() or not ids:
            raise ValueError(f"--prompt {prompt!r} is empty")
    eos = eos_id(loaded.tokenizer)
    key = jax.random.key(args.seed)
    if task == "seq2seq":
        for ids in encoded:
            out = generate_seq2seq(
                apply, params, jnp.asarray([ids], jnp.int32), args.max_new_tokens,
                decoder_start_token_id=getattr(loaded.module.config, "decoder_start_token_id", 0),
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, key=key,
                eos_token_id=eos)
            print(loaded.tokenizer.decode([int(t) for t in out[0] if int(t) != eos]))
        return 0
    longest = max(len(ids) for ids in encoded)
    limit = max_positions(loaded.module)
    if limit is not None and longest + args.max_new_tokens > limit:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} after a {longest}-token "
                         f"prompt exceeds the model's {limit} positions: use at most "
                         f"{max(limit - longest, 0)}")
    # Prompts of different lengths are left-padded; the mask and positions skip the padding.
    pad = 0 if eos is None else eos
    batch = jnp.asarray([[pad] * (longest - len(ids)) + ids for ids in encoded], jnp.int32)
    mask = jnp.asarray([[0] * (longest - len(ids)) + [1] * len(ids) for ids in encoded])
    out = run_generate(apply, params, loaded.module, batch, args.max_new_tokens,
                       attention_mask=mask, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, key=key, eos_token_id=eos, adapter_ids=adapter_ids)
    for prompt, ids, row in zip(prompts, encoded, out, strict=True):
        new = [int(t) for t in row[longest:] if eos is None or int(t) != eos]
        # Decode prompt + continuation together (word-piece spacing), print the prompt as given.
        prefix, whole = loaded.tokenizer.decode(ids), loaded.tokenizer.decode(ids + new)
        print(prompt + (whole[len(prefix):] if whole.startswith(prefix)
                        else loaded.tokenizer.decode(new)))
    return 0
