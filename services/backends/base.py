"""The one interface every inference backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class BackendUnavailable(RuntimeError):
    """The runtime cannot run models right now (a Triton outage, say); the gateway answers 503."""


class Backend(ABC):
    """Runs one model of the repository on one batch.

    ``model`` is a Triton model name from the manifest (``<name>_image``, ``<name>_text``, ``<name>_tags``);
    ``inputs`` is the batch for its single input tensor; the result is its single output tensor.
    Pre- and post-processing (decoding, tokenizing) happen outside, in the engine.
    """

    name: str  # the runtime, as /v1/models reports it

    @abstractmethod
    async def infer(self, model: str, inputs: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    async def ready(self) -> bool:
        """True when the runtime and every model the manifest names can serve now."""

    async def prepare(self, previous: Backend) -> None:  # noqa: B027 (optional: in-process runtimes loaded all)
        """Before a hot swap (services/reload.py) replaces ``previous``: make this backend's models servable."""

    async def release(self) -> None:  # noqa: B027 (optional)
        """After a hot swap replaced this backend: free what only it used (Triton: the old model versions)."""

    async def close(self) -> None:  # noqa: B027 (optional: most runtimes have nothing to release)
        """Release sessions, channels and threads."""
