"""Encode float images as 8-bit PNG with zlib alone (no Pillow on the serving path)."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, low: float = -1.0, high: float = 1.0) -> bytes:
    """PNG bytes of one (C, H, W) image with values in [low, high]; C is 1 (gray) or 3 (RGB)."""
    channels, height, width = image.shape
    if channels not in (1, 3):
        raise ValueError(f"PNG needs 1 or 3 channels, got {channels}")
    scaled = (np.clip((image - low) / (high - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    pixels = np.ascontiguousarray(scaled.transpose(1, 2, 0)).reshape(height, width * channels)
    rows = np.hstack([np.zeros((height, 1), np.uint8), pixels])  # filter type 0 on every row
    color_type = 0 if channels == 1 else 2
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )
