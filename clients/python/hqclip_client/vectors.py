"""Embeddings on the wire (base64 of little-endian float32) and in Python: numpy arrays when numpy is installed,
lists of floats otherwise."""

from __future__ import annotations

import array
import base64
import sys
from typing import Any

try:
    import numpy as np
except ImportError:  # numpy is optional
    np = None

Vectors = Any
"""``numpy.ndarray`` [n, D] float32 when numpy is installed, else ``list[list[float]]``."""


def decode(encoded: list[str], dim: int | None = None) -> Vectors:
    """Rows given as base64 float32 (the gateway's ``encoding_format=base64``)."""
    raw = [base64.b64decode(value) for value in encoded]
    if np is not None:
        if not raw:
            return np.zeros((0, dim or 0), dtype=np.float32)
        return np.stack([np.frombuffer(row, dtype="<f4") for row in raw]).astype(np.float32, copy=False)
    rows = []
    for row in raw:
        values = array.array("f", row)
        if sys.byteorder == "big":
            values.byteswap()
        rows.append(values.tolist())
    return rows


def concat(parts: list[Vectors]) -> Vectors:
    """Chunks of rows as one."""
    if np is not None:
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
    return [row for part in parts for row in part]


def to_lists(vectors: Any) -> list[list[float]]:
    """Rows of floats for a JSON body, from an array [n, D] or [D], or lists."""
    if hasattr(vectors, "tolist"):
        vectors = vectors.tolist()
    vectors = list(vectors)
    if vectors and not isinstance(vectors[0], (list, tuple)):
        vectors = [vectors]
    return [[float(x) for x in row] for row in vectors]
