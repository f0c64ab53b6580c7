"""Inference backends: one small interface (base.py), one file per runtime."""

from __future__ import annotations

from hqclip.repo.manifest import Manifest
from services.backends.base import Backend, BackendUnavailable
from services.settings import Settings


def create_backend(settings: Settings, manifest: Manifest) -> Backend:
    """The backend the settings name, for the models the manifest names."""
    if settings.backend == "triton":
        from services.backends.triton import TritonBackend

        return TritonBackend(settings, manifest)
    variant = manifest.variants.get(settings.precision)
    if settings.backend == "openvino" or (variant is not None and variant.runtime == "openvino"):
        from services.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(settings, manifest)
    from services.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(settings, manifest)


__all__ = ["Backend", "BackendUnavailable", "create_backend"]
