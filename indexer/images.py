"""Tiny dependency-free PNG encoder for display thumbnails (grayscale, nearest-neighbour upscaling)."""
from __future__ import annotations

import base64
import struct
import zlib

import numpy as np


def png_bytes(gray: np.ndarray, scale: int = 1) -> bytes:
    """uint8 [H, W] -> PNG bytes (8-bit grayscale)."""
    img = np.asarray(gray, dtype=np.uint8)
    if scale > 1:
        img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def png_data_url(gray: np.ndarray, scale: int = 1) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(gray, scale)).decode()
