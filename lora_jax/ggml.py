"""GGML's block-quantized weights (llama.cpp's Q4_0, Q4_1 and Q8_0) kept as the frozen base.

A GGUF file stores each weight in blocks of 32 consecutive values along its input axis (the
last axis of torch's [out, in] layout), each block one float16 scale `d` (and, for Q4_1, a
float16 minimum `m`) and 32 codes:

- Q4_0: 4-bit codes q, value d (q - 8); 18 bytes a block (4.5 bits a weight).
- Q4_1: 4-bit codes q, value d q + m; 20 bytes a block (5 bits a weight).
- Q8_0: 8-bit signed codes q, value d q; 34 bytes a block (8.5 bits a weight).

(ggml-common.h's `block_q4_0` / `block_q4_1` / `block_q8_0`; in a 4-bit block the byte j holds
element j in its low nibble and element j + 16 in its high one.) `from_gguf` turns a tensor's raw
bytes into a `GGMLTensor`: the codes as an array of the weight's shape and the scales (and
minimums) as arrays with one entry per block, so LoRA trains on the file's own 4-bit or 8-bit
base without a float round trip; the values equal what llama.cpp's (and the `gguf` package's)
dequantization gives, and like `lora_jax.quantize`'s NF4 it is dequantized inside the jitted
layer, one weight at a time.

>>> import jax.numpy as jnp, numpy as np
>>> d = np.float16(0.5).tobytes()
>>> raw = np.frombuffer(d + bytes(range(32)), np.uint8)[None]  # one Q8_0 block
>>> w = from_gguf(raw, "Q8_0", (1, 32))
>>> jnp.asarray(w)[0, :4].tolist()
[0.0, 0.5, 1.0, 1.5]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lora_jax.quantization import _Quantized

BLOCK = 32
# Block type -> (bytes a block, whether it stores a minimum, code dtype).
FORMATS = {"Q4_0": (18, False, jnp.uint4), "Q4_1": (20, True, jnp.uint4),
           "Q8_0": (34, False, jnp.int8)}


@jax.tree_util.register_pytree_with_keys_class
class GGMLTensor(_Quantized):
    """A weight in one of GGML's block formats (`kind`): `codes` of the weight's shape, `scale`
    and `minimum` (None for the formats without one) with the blocked `axis` (-1 as read from a
    file, -2 once transposed to a flax kernel [in, out]) divided by 32."""

    FIELDS = ("codes", "scale", "minimum")
    STATIC = ("kind", "axis")

    def _expand(self, x: jax.Array) -> jax.Array:
        """A per-block array broadcast against the codes split into blocks."""
        return jnp.expand_dims(x.astype(jnp.float32), self.axis % x.ndim + 1)

    def _float(self) -> jax.Array:
        axis = self.axis % self.codes.ndim
        shape = self.codes.shape
        blocks = self.codes.reshape(*shape[:axis], shape[axis] // BLOCK, BLOCK,
                                    *shape[axis + 1:]).astype(jnp.float32)
        if self.kind == "Q4_0":
            blocks = blocks - 8.0
        value = blocks * self._expand(self.scale)
        if self.minimum is not None:
            value = value + self._expand(self.minimum)
        return value.reshape(shape)

    @property
    def T(self) -> GGMLTensor:  # noqa: N802 (numpy's name)
        """The transposed matrix, e.g. torch's [out, in] weight as a flax kernel [in, out]."""
        if self.ndim != 2:
            raise ValueError(f"T needs a 2-axis weight, got shape {self.shape}")
        fields = (None if f is None else jnp.swapaxes(f, 0, 1)
                  for f in (self.codes, self.scale, self.minimum))
        return GGMLTensor(*fields, dtype=self.dtype, kind=self.kind, axis=-3 - self.axis)

    def _specs(self, stack: tuple[Any, ...], rows: Any, cols: Any) -> tuple[P, ...]:
        # The scales have the kernel's axes, with fewer entries on the blocked one: a shard of
        # rows (or columns) holds whole blocks whenever the per-block axis divides over it.
        spec = P(*stack, rows, cols)
        return spec, spec, None if self.minimum is None else spec

    def __repr__(self) -> str:
        return f"GGMLTensor({self.kind}, shape={self.shape}, dtype={self.dtype.name})"


def from_gguf(raw: np.ndarray, kind: str, shape: tuple[int, ...], dtype: Any = jnp.float32
              ) -> GGMLTensor:
    """The `GGMLTensor` of a GGUF tensor's raw bytes (`uint8 [..., rows, bytes a row]`, as
    `gguf.GGUFReader` gives `tensor.data`), of numpy `shape` (torch's order, input axis last).
    `dtype`: what it dequantizes to. Other block types raise a ValueError."""
    if kind not in FORMATS:
        raise ValueError(f"GGML block type {kind} cannot be kept quantized (only "
                         f"{sorted(FORMATS)}); load it as float or re-quantize it as NF4")
    block_bytes, has_minimum, code_dtype = FORMATS[kind]
    *lead, cols = shape
    if cols % BLOCK:
        raise ValueError(f"a {kind} tensor's last axis must be a multiple of {BLOCK}, got "
                         f"shape {tuple(shape)}")
    blocks = np.ascontiguousarray(raw, np.uint8).reshape(*lead, cols // BLOCK, block_bytes)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0] if has_minimum else None
    payload = blocks[..., 4 if has_minimum else 2:]
    if code_dtype == jnp.int8:
        codes = payload.view(np.int8)
    else:  # byte j: element j (low nibble) and element j + 16 (high nibble)
        codes = np.concatenate([payload & 0x0F, payload >> 4], axis=-1)
    codes = codes.reshape(shape)
    return GGMLTensor(jnp.asarray(codes).astype(code_dtype), jnp.asarray(scale),
                      None if minimum is None else jnp.asarray(minimum), dtype=dtype, kind=kind,
                      axis=-1)
