"""A tiny random Llama written as a GGUF file in llama.cpp's layout, its projections in GGML
blocks (the `gguf` package quantizes Q4_0 / Q4_1 / Q8_0; K-format blocks are random codes with
realistic scales, as it has no K quantizer), for tests of `load_gguf` and the CLI on a .gguf
model that load in a second."""

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

from lora_jax.quant import ggml

LAYERS, HEADS, KV_HEADS = 2, 4, 2
# Block type of each projection (norms F32, the embedding Q8_0 as in SmolLM2's file).
PROJECTIONS = {"attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q4_1",
               "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "Q8_0"}
# The K formats need inputs in multiples of 256: a wider model (hidden 256, ffn 512).
K_PROJECTIONS = {"attn_q": "Q4_K", "attn_k": "Q6_K", "attn_v": "Q5_K", "attn_output": "Q4_K",
                 "ffn_gate": "Q4_K", "ffn_up": "Q6_K", "ffn_down": "Q5_K"}
# Byte-level BPE's printable characters ("Ġ" is the space) and one merge.
TOKENS = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "!\""]
VOCAB = len(TOKENS)
# Where each format keeps its float16 scale / minimum in a block (the rest: codes, sub-scales).
F16_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2),
          "Q6_K": (208,)}


def random_blocks(kind, shape, seed=0, scale=0.01):
    """Raw bytes of a tensor of `shape` in `kind`: random codes and sub-scales, float16 scales
    and minimums of about `scale` (random bytes there could be NaN)."""
    fmt = ggml.FORMATS[kind]
    rng = np.random.default_rng(seed)
    *lead, cols = shape
    blocks = rng.integers(0, 256, (*lead, cols // fmt.block, fmt.block_bytes), dtype=np.uint8)
    for at in F16_AT[kind]:
        values = (rng.normal(size=blocks.shape[:-1]) * scale).astype(np.float16)
        blocks[..., at:at + 2] = values[..., None].view(np.uint8)
    return blocks.reshape(*lead, -1)


def write_tiny_gguf(path, projections=PROJECTIONS, seed=0, hidden=64, ffn=128):
    """A random 2-layer Llama in llama.cpp's file layout, projections in `projections` blocks."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(["! \""])
    writer.add_token_types([1] * VOCAB)
    kv = hidden // HEADS * KV_HEADS
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden),
              "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}

    def add(name, shape, kind):
        w = (rng.normal(size=shape) * 0.2).astype(np.float32)
        if kind == "F32":
            writer.add_tensor(name, w)
            return
        raw = random_blocks(kind, shape, int(rng.integers(1 << 30)), scale=0.002) \
            if kind.endswith("_K") else quants.quantize(w, GGMLQuantizationType[kind])
        writer.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[kind])

    add("token_embd.weight", (VOCAB, hidden), "Q8_0")
    add("output_norm.weight", (hidden,), "F32")
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (hidden,), "F32")
        add(f"blk.{i}.ffn_norm.weight", (hidden,), "F32")
        for name, kind in projections.items():
            add(f"blk.{i}.{name}.weight", shapes[name], kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
