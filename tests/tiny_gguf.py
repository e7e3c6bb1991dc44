"""A tiny random Llama written as a GGUF file in llama.cpp's layout, its projections in GGML
blocks (Q4_0, Q4_1, Q8_0; the `gguf` package quantizes them), for tests of `load_gguf` and the
CLI on a .gguf model that load in a second."""

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
# Block type of each projection in the tiny file (all three formats; norms F32, the
# embedding Q8_0 as in SmolLM2's file).
PROJECTIONS = {"attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q4_1",
               "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "Q8_0"}
SHAPES = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
          "attn_v": (HIDDEN // HEADS * KV_HEADS, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
          "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
# Byte-level BPE's printable characters ("Ġ" is the space) and one merge.
TOKENS = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "!\""]
VOCAB = len(TOKENS)


def write_tiny_gguf(path, projections=PROJECTIONS, seed=0):
    """A random 2-layer Llama in llama.cpp's file layout, projections in `projections` blocks."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(["! \""])
    writer.add_token_types([1] * VOCAB)

    def add(name, shape, kind):
        w = (rng.normal(size=shape) * 0.2).astype(np.float32)
        if kind == "F32":
            writer.add_tensor(name, w)
        else:
            kind = GGMLQuantizationType[kind]
            writer.add_tensor(name, quants.quantize(w, kind), raw_dtype=kind)

    add("token_embd.weight", (VOCAB, HIDDEN), "Q8_0")
    add("output_norm.weight", (HIDDEN,), "F32")
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), "F32")
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), "F32")
        for name, kind in projections.items():
            add(f"blk.{i}.{name}.weight", SHAPES[name], kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
