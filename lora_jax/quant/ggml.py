"""GGML's block-quantized weights (llama.cpp's Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) kept as the
frozen base.

A GGUF file stores each weight in blocks of consecutive values along its input axis (the last
axis of torch's [out, in] layout). The formats (ggml-common.h's `block_q4_0` ... `block_q6_K`):

- Q4_0 / Q4_1 / Q8_0: blocks of 32 with a float16 scale d (and for Q4_1 a float16 minimum m);
  values d (q - 8), d q + m, d q for 4-bit / 4-bit / signed 8-bit codes q (4.5 / 5 / 8.5 bits a
  weight). In a 4-bit block byte j holds element j (low nibble) and element j + 16 (high).
- Q4_K / Q5_K: super-blocks of 256 with float16 d and dmin, and 8 sub-blocks of 32 with 6-bit
  scales sc and minimums m (packed in 12 bytes); values d sc q - dmin m for 4-bit (Q5_K: 5-bit,
  its high bits apart) codes.
- Q6_K: super-blocks of 256 with float16 d and 16 sub-blocks of 16 with signed 8-bit scales sc;
  values d sc q for 6-bit codes q - 32 (4 low and 2 high bits stored apart).

`from_gguf` turns a tensor's raw bytes into a `GGMLTensor` (codes of the weight's shape, scales
and minimums with one entry per block, two levels for the K formats), so LoRA trains on the file's
own base: it dequantizes inside the jitted layer, one weight at a time, to exactly llama.cpp's
values (docs/guides/qlora.md; 5- and 6-bit codes are held in 8 bits).

>>> import jax.numpy as jnp, numpy as np
>>> d = np.float16(0.5).tobytes()
>>> raw = np.frombuffer(d + bytes(range(32)), np.uint8)[None]  # one Q8_0 block
>>> w = from_gguf(raw, "Q8_0", (1, 32))
>>> jnp.asarray(w)[0, :4].tolist()
[0.0, 0.5, 1.0, 1.5]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lora_jax.quant.quantize import _Quantized

SUPER = 256  # values in a K-format super-block


class Format(NamedTuple):
    """One block format: bytes a block, values a block, values a scale (the sub-block), whether
    a (super-)block holds minimums, and the codes' dtype."""

    block_bytes: int
    block: int
    sub_block: int
    has_minimum: bool
    codes: Any


FORMATS = {
    "Q4_0": Format(18, 32, 32, False, jnp.uint4),
    "Q4_1": Format(20, 32, 32, True, jnp.uint4),
    "Q8_0": Format(34, 32, 32, False, jnp.int8),
    "Q4_K": Format(144, SUPER, 32, True, jnp.uint4),
    "Q5_K": Format(176, SUPER, 32, True, jnp.uint8),
    "Q6_K": Format(210, SUPER, 16, False, jnp.int8),
}


@jax.tree_util.register_pytree_with_keys_class
class GGMLTensor(_Quantized):
    """A weight in one of GGML's block formats (`kind`): `codes` of the weight's shape; `scale`
    and `minimum` (None for formats without one) per block, and for the K formats `sub_scale`
    and `sub_minimum` per sub-block (else None), along the blocked `axis` (-1 as read from a
    file, -2 once transposed to a flax kernel [in, out]). A K format's minimum is stored negated
    (-dmin), so every format adds it."""

    FIELDS = ("codes", "scale", "minimum", "sub_scale", "sub_minimum")
    STATIC = ("kind", "axis")
    codes: jax.Array
    scale: jax.Array
    minimum: jax.Array | None
    sub_scale: jax.Array | None
    sub_minimum: jax.Array | None
    kind: str
    axis: int

    def _repeat(self, x: jax.Array, times: int) -> jax.Array:
        return jnp.repeat(x.astype(jnp.float32), times, axis=self.axis % x.ndim)

    def _per_sub_block(self, coarse: jax.Array, fine: jax.Array | None) -> jax.Array:
        """A (super-)block array as one float32 entry per sub-block."""
        fmt = FORMATS[self.kind]
        if fine is None:
            return coarse.astype(jnp.float32)
        return self._repeat(coarse, fmt.block // fmt.sub_block) * fine.astype(jnp.float32)

    def _float(self) -> jax.Array:
        sub = FORMATS[self.kind].sub_block
        codes = self.codes.astype(jnp.float32) - (8.0 if self.kind == "Q4_0" else 0.0)
        value = codes * self._repeat(self._per_sub_block(self.scale, self.sub_scale), sub)
        if self.minimum is not None:
            value = value + self._repeat(self._per_sub_block(self.minimum, self.sub_minimum), sub)
        return value

    @property
    def T(self) -> GGMLTensor:  # noqa: N802 (numpy's name)
        """The transposed matrix, e.g. torch's [out, in] weight as a flax kernel [in, out]."""
        if self.ndim != 2:
            raise ValueError(f"T needs a 2-axis weight, got shape {self.shape}")
        fields = (None if f is None else jnp.swapaxes(f, 0, 1) for f in self.tree_flatten()[0])
        return GGMLTensor(*fields, dtype=self.dtype, kind=self.kind, axis=-3 - self.axis)

    def _specs(self, stack: tuple[Any, ...], rows: Any, cols: Any) -> tuple[P | None, ...]:
        # The scales have the kernel's axes, with fewer entries on the blocked one: a shard of
        # rows (or columns) holds whole blocks whenever the per-block axis divides over it.
        spec = P(*stack, rows, cols)
        return tuple(None if f is None else spec for f in self.tree_flatten()[0])

    def __repr__(self) -> str:
        return f"GGMLTensor({self.kind}, shape={self.shape}, dtype={self.dtype.name})"


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[..., start:start + 2].copy().view(np.float16)[..., 0]


def _nibbles(packed: np.ndarray, groups: int) -> np.ndarray:
    """Codes of bytes packed as `groups` runs, each run's low nibbles then its high nibbles."""
    runs = packed.reshape(*packed.shape[:-1], groups, -1)
    return np.stack([runs & 0x0F, runs >> 4], axis=-2).reshape(*packed.shape[:-1], -1)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 8 six-bit scales and minimums from their 12 bytes: bytes 0-3 and 4-7 hold
    scales / minimums 0-3 in their low 6 bits and the top 2 bits of 4-7 in their high 2 bits;
    bytes 8-11 hold the low 4 bits of scales 4-7 (low nibble) and minimums 4-7 (high)."""
    low_sc, low_m, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([low_sc & 0x3F, (rest & 0x0F) | ((low_sc >> 2) & 0x30)], axis=-1)
    minimums = np.concatenate([low_m & 0x3F, (rest >> 4) | ((low_m >> 2) & 0x30)], axis=-1)
    return scales, minimums


_MaybeArray = np.ndarray | None


def _parse(kind: str, blocks: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, _MaybeArray, _MaybeArray, _MaybeArray]:
    """(codes [..., block], scale, minimum, sub_scale, sub_minimum) of raw blocks [..., bytes];
    absent fields None, per-block fields [...], per-sub-block ones [..., sub-blocks]."""
    if kind == "Q4_0":
        return _nibbles(blocks[..., 2:], 1), _f16(blocks, 0), None, None, None
    if kind == "Q4_1":
        return _nibbles(blocks[..., 4:], 1), _f16(blocks, 0), _f16(blocks, 2), None, None
    if kind == "Q8_0":
        return blocks[..., 2:].view(np.int8), _f16(blocks, 0), None, None, None
    if kind in ("Q4_K", "Q5_K"):
        scales, minimums = _k_scales(blocks[..., 4:16])
        codes = _nibbles(blocks[..., -128:], 4)  # 4 runs of 32 bytes: sub-blocks 2j and 2j + 1
        if kind == "Q5_K":  # bit j of high-bit byte i: element i of sub-block j
            high = blocks[..., 16:48, None] >> np.arange(8, dtype=np.uint8) & 1
            codes = codes | np.swapaxes(high, -1, -2).reshape(codes.shape) << 4
        return codes, _f16(blocks, 0), -_f16(blocks, 2), scales, minimums
    # Q6_K: two halves of 128 values, each from 64 low-nibble bytes and 32 high-bit bytes
    low = _nibbles(blocks[..., :128], 2).reshape(*blocks.shape[:-1], 2, 4, 32)
    high = blocks[..., 128:192].reshape(*blocks.shape[:-1], 2, 1, 32) >> \
        np.array([0, 2, 4, 6], np.uint8)[:, None] & 3
    codes = ((low | high << 4).astype(np.int8) - 32).reshape(*blocks.shape[:-1], SUPER)
    return codes, _f16(blocks, 208), None, blocks[..., 192:208].view(np.int8), None


def from_gguf(raw: np.ndarray, kind: str, shape: tuple[int, ...], dtype: Any = jnp.float32
              ) -> GGMLTensor:
    """The `GGMLTensor` of a GGUF tensor's raw bytes (`uint8 [..., rows, bytes a row]`, as
    `gguf.GGUFReader` gives `tensor.data`), of numpy `shape` (torch's order, input axis last).
    `dtype`: what it dequantizes to. Other block types raise a ValueError."""
    if kind not in FORMATS:
        raise ValueError(f"GGML block type {kind} cannot be kept quantized (only "
                         f"{sorted(FORMATS)}); load it as float or re-quantize it as NF4")
    fmt = FORMATS[kind]
    *lead, cols = shape
    if cols % fmt.block:
        raise ValueError(f"a {kind} tensor's last axis must be a multiple of {fmt.block}, got "
                         f"shape {tuple(shape)}")
    blocks = np.ascontiguousarray(raw, np.uint8).reshape(*lead, cols // fmt.block,
                                                         fmt.block_bytes)
    codes, *scales = _parse(kind, blocks)
    # Per-block fields [..., rows, blocks]; per-sub-block ones [..., rows, blocks x subs].
    fields = [None if f is None else jnp.asarray(f.reshape(*lead, -1)) for f in scales]
    return GGMLTensor(jnp.asarray(codes.reshape(shape)).astype(fmt.codes), *fields, dtype=dtype,
                      kind=kind, axis=-1)
