"""Quantized frozen bases for QLoRA: NF4 and int8 (`quantize`), and GGML's block formats."""
