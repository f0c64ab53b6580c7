"""The one interface every inference backend implements, and the router that serves each tower from its own."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from hqclip.repo.layout import VERSION


class BackendUnavailable(RuntimeError):
    """The runtime cannot run models right now (a Triton outage, say); the gateway answers 503."""


@dataclass(frozen=True)
class Load:
    """One model an in-process backend loads: its repository name, its version folder (the manifest's), what it
    computes in, whether it reads tokens."""

    model: str
    version: int = VERSION
    precision: str = "fp32"
    text: bool = False


class Backend(ABC):
    """Runs one model of the repository on one batch.

    ``model`` is a Triton model name from the manifest (``<name>_image``, ``<name>_text``, ``<name>_tags``);
    ``inputs`` is the batch for its single input tensor; the result is its single output tensor.
    Pre- and post-processing (decoding, tokenizing) happen outside, in the engine.
    """

    name: str  # the runtime, as /v1/models reports it
    precision: str = "fp32"  # the precision served; services/backends/__init__.py sets it
    choice: dict | None = None  # which runtime and precision serve each tower, and why (/v1/models "selection")

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


class Routed(Backend):
    """Each model on the backend chosen for it (HQCLIP_BACKEND=auto may pick a runtime per tower)."""

    def __init__(self, routes: dict[str, Backend]) -> None:
        self._routes = routes
        self._backends = list({id(b): b for b in routes.values()}.values())
        self.name = "+".join(dict.fromkeys(b.name for b in self._backends))

    async def infer(self, model: str, inputs: np.ndarray) -> np.ndarray:
        return await self._routes[model].infer(model, inputs)

    async def ready(self) -> bool:
        return all([await backend.ready() for backend in self._backends])

    async def close(self) -> None:
        for backend in self._backends:
            await backend.close()
