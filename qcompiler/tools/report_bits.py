"""How the report writes bit widths: fp16 and float32 as bit counts, and a layer's per-channel
allocation as one character per input channel (shared by `report.json` and `report.html`)."""

from __future__ import annotations

import numpy as np

FP16_BITS = 16
FLOAT_BITS = 32
CHANNEL_CHARS = {FP16_BITS: "h", **{b: str(b) for b in range(1, 9)}}  # `channel_bits` encoding


def encode_channel_bits(bits: np.ndarray) -> str:
    """One character per input channel, in the layer's channel order: '1'..'8' bits, 'h' fp16."""
    return "".join(CHANNEL_CHARS[int(b)] for b in bits)


def decode_channel_bits(text: str) -> np.ndarray:
    return np.array([FP16_BITS if c == "h" else int(c) for c in text], np.int64)
