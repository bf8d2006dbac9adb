"""Random, well-conditioned tensor data in ggml types, generated without a float round trip.

Quantized tensors are built block by block in their own format: random quant codes (uniform bytes)
with fixed per-block scales chosen so that the dequantized values have mean ~0 and the asked standard
deviation. This writes a 17 GB Q4_K model at disk speed; quantizing float weights would take an hour.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

from rotary_gguf.errors import SynthError

# Types synth can write, and for quantized ones how to fill a block (see _fill_*).
FLOAT_TYPES = {T.F32: np.float32, T.F16: np.float16}
QUANT_TYPES = (T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K)

# Root mean square of the uniform integer codes of each format (after its offset).
_RMS_Q8_0 = np.sqrt((255**2 - 1) / 12)  # codes -127..127
_RMS_Q4 = np.sqrt((16**2 - 1) / 12 + 0.25)  # codes 0..15 minus 8
_RMS_Q6 = np.sqrt((64**2 - 1) / 12 + 0.25)  # codes 0..63 minus 32
_Q4_K_SCALE = 32  # every 6-bit sub-block scale and min
_Q6_K_SCALE = 16  # every int8 sub-block scale


def supported(qtype: T, row_length: int) -> bool:
    """Whether a row of this length can be stored in this type (whole blocks)."""
    return row_length % GGML_QUANT_SIZES[qtype][0] == 0


def random_tensor(rng: np.random.Generator, shape: tuple[int, ...], qtype: T, std: float) -> np.ndarray:
    """Random tensor of ggml shape (ne0 first) in qtype: floats as floats, quantized types as raw bytes.

    The result's numpy shape is the reversed ggml shape (byte shape for quantized types), as
    GGUFWriter.add_tensor / write_tensor_data expect.
    """
    np_shape = tuple(reversed(shape))
    if qtype in FLOAT_TYPES:
        return (rng.standard_normal(np_shape, dtype=np.float32) * np.float32(std)).astype(FLOAT_TYPES[qtype])
    if qtype not in QUANT_TYPES:
        raise SynthError(f"synth cannot write ggml type {qtype.name}; use one of f32, f16, q8_0, q4_0, q4_k, q6_k")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[0] % block:
        raise SynthError(f"row length {shape[0]} is not a multiple of the {qtype.name} block size {block}")
    n_blocks = int(np.prod(shape, dtype=np.int64)) // block
    blocks = np.frombuffer(rng.bytes(n_blocks * type_size), dtype=np.uint8).reshape(n_blocks, type_size).copy()
    # A little spread in the per-block scale, as real quantized weights have.
    jitter = rng.uniform(0.8, 1.2, size=n_blocks).astype(np.float32)
    _FILL[qtype](blocks, std * jitter)
    return blocks.reshape(*np_shape[:-1], shape[0] // block * type_size)


def _put_f16(blocks: np.ndarray, start: int, values: np.ndarray) -> None:
    blocks[:, start:start + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _fill_q8_0(blocks: np.ndarray, std: np.ndarray) -> None:
    # d (f16) then 32 int8 codes; -128 is excluded so codes are symmetric.
    codes = blocks[:, 2:].view(np.int8)
    codes[codes == -128] = -127
    _put_f16(blocks, 0, std / _RMS_Q8_0)


def _fill_q4_0(blocks: np.ndarray, std: np.ndarray) -> None:
    # d (f16) then 16 bytes of nibbles; value = d * (code - 8).
    _put_f16(blocks, 0, std / _RMS_Q4)


def _fill_q4_k(blocks: np.ndarray, std: np.ndarray) -> None:
    # d, dmin (f16), 12 bytes of packed 6-bit scales and mins, 128 bytes of nibbles;
    # value = d * sc * code - dmin * m with sc = m = 32, and dmin = 7.5 d centres the codes 0..15.
    d = std / (_Q4_K_SCALE * np.sqrt((16**2 - 1) / 12))
    _put_f16(blocks, 0, d)
    _put_f16(blocks, 2, d * 7.5)
    low, high = _Q4_K_SCALE & 0x3F, _Q4_K_SCALE >> 4
    blocks[:, 4:12] = low | ((high & 0x3) << 6)  # scales/mins 0-3, high bits of 4-7 on top
    blocks[:, 12:16] = (_Q4_K_SCALE & 0xF) | ((_Q4_K_SCALE & 0xF) << 4)  # low nibbles of 4-7


def _fill_q6_k(blocks: np.ndarray, std: np.ndarray) -> None:
    # ql[128], qh[64], int8 scales[16], d (f16); value = d * scale * (code - 32).
    blocks[:, 192:208] = _Q6_K_SCALE
    _put_f16(blocks, 208, std / (_Q6_K_SCALE * _RMS_Q6))


_FILL = {T.Q8_0: _fill_q8_0, T.Q4_0: _fill_q4_0, T.Q4_K: _fill_q4_k, T.Q6_K: _fill_q6_k}
