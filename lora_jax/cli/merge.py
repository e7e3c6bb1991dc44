"""`lora-jax merge`: fold an adapter into its base and write HF-format safetensors to a new
folder (filled as a temporary sibling, then renamed: never over an input, never a part)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_jax.cli.adapter import check_adapter
from lora_jax.cli.files import check_writable, empty_or_absent, new_folder
from lora_jax.cli.model import load_model
from lora_jax.core.jsonfile import read_json


def merge(args: argparse.Namespace) -> int:
    """`lora-jax merge`: base + adapter -> HF-format safetensors in the new folder `--out`."""
    import lora_jax
    from lora_jax.models.loading import read_safetensors, save_hf
    from lora_jax.peft.files import load_peft

    out = Path(args.out)
    if not empty_or_absent(out):
        raise ValueError(f"--out {out} exists and is not empty: merge writes a new folder and "
                         "never replaces one (pick another --out)")
    check_writable(out.parent if not out.exists() else out)  # before anything is read
    adapter = Path(args.adapter)
    fields = check_adapter(adapter)
    base = args.model or fields.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter / 'adapter_config.json'} names no base model "
                         "(base_model_name_or_path): pass --model")
    heads = {k: v for k, v in read_safetensors(str(adapter / "adapter_model.safetensors")).items()
             if k.endswith("classifier.weight")}
    num_labels = next(iter(heads.values())).shape[0] if heads else None
    if fields.get("task_type") == "SEQ_CLS" or heads:
        task = "classify"
    else:
        task = "base"  # the base model as it is (a causal LM, or an encoder without a head)
    with new_folder(out) as tmp:  # a temporary sibling: a read-only place fails here, early
        loaded, _ = load_model(base, task, num_labels, quantize=args.quantize)
        params, config = load_peft(adapter, loaded.params, model_type=loaded.model_type,
                                   layouts=loaded.layouts())
        merged = lora_jax.merge(params, config, safe=True)
        source = Path(loaded.source)
        save_hf(tmp, loaded.module, merged, tokenizer=loaded.tokenizer,
                hf_config=read_json(source / "config.json") if source.is_dir() else None)
        if not empty_or_absent(out):  # someone wrote there meanwhile: keep theirs
            raise ValueError(f"--out {out} was filled while merging: nothing replaced")
    print(f"wrote merged {loaded.model_type} weights to {out}/model.safetensors")
    return 0
