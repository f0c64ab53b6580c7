"""Images as the gateway takes them: encoded bytes (JPEG, PNG, ...), from paths, bytes, PIL images or arrays."""

from __future__ import annotations

import base64
import io
import mimetypes
import os
import struct
import zlib
from typing import Any, Union

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]
"""A file path, encoded bytes, a PIL image, or a uint8 array shaped [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]."""

_PNG_COLOUR = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def to_bytes(image: ImageInput) -> bytes:
    """Encoded image bytes; a path is read, a PIL image or an array is encoded losslessly as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image, without importing PIL
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if hasattr(image, "__array_interface__"):
        return png(image)
    raise TypeError(f"an image must be a path, bytes, a PIL image or a uint8 array, not {type(image).__name__}")


def png(array: Any) -> bytes:
    """A uint8 array [H, W], [H, W, C] (C = 1..4) as PNG, with no imaging library needed."""
    import numpy as np

    pixels = np.asarray(array)
    if pixels.dtype != np.uint8:
        raise TypeError(f"an image array must be uint8 (0-255), not {pixels.dtype}; e.g. (x * 255).astype('uint8')")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in _PNG_COLOUR or 0 in pixels.shape:
        raise ValueError(f"an image array must be [H, W] or [H, W, 1-4] and non-empty, not {list(pixels.shape)}")
    height, width, channels = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, width * channels)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def filename(image: ImageInput, index: int) -> str:
    return os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else f"image-{index}"


def mime(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"
