"""Comparing embeddings in tests and benchmarks."""

from __future__ import annotations

import numpy as np


def cosines(a, b) -> np.ndarray:
    """Row-wise cosine similarity of two equally shaped batches (any array-likes), in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
