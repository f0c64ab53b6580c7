"""In-process OpenVINO: serves the bf16 variant on CPUs with bf16 matrix units (AVX512-BF16, AMX), the int8 variant
(NNCF's QDQ graphs, on VNNI / AMX-INT8), and fp32 where ``HQCLIP_BACKEND=auto`` measured it faster than ONNX Runtime
for a tower, or ``HQCLIP_BACKEND=openvino`` says so.

ONNX Runtime's CPU provider has almost no bf16 kernels, so a bf16 variant runs here. OpenVINO reads the same
``<repo>/<model>/1/model.onnx`` files as the ONNX Runtime backend; ``INFERENCE_PRECISION_HINT`` decides what the
matrix multiplications compute in: bf16 for the towers of a bf16 variant, f32 for everything else (the tag head).
The manifest says which runtime a variant needs (``Variant.runtime``); services/backends/__init__.py chooses.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openvino as ov

from hqclip.repo.layout import onnx_path
from services.backends.base import Backend, Load
from services.settings import Settings

# What matrix products compute in. int8: the QDQ graph says which products are int8 (VNNI, AMX-INT8); the rest f32.
RUNTIME_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def compile_model(core: ov.Core, path: Path, precision: str, threads: int = 0) -> ov.CompiledModel:
    """One model compiled for latency on this machine's CPU, computing in ``precision`` (fp32, bf16, int8)."""
    config = {"INFERENCE_PRECISION_HINT": RUNTIME_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return core.compile_model(str(path), "CPU", config)


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, settings: Settings, loads: list[Load]) -> None:
        core = ov.Core()
        self._models = {
            load.model: compile_model(core, onnx_path(settings.model_repo, load.model, load.version), load.precision,
                                      settings.ort_threads)
            for load in loads
        }
        # An infer request holds its own buffers: one per thread and model. OpenVINO releases the GIL while it runs.
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=settings.batch.text_workers + settings.batch.image_workers,
                                        thread_name_prefix="openvino")

    def run(self, model: str, inputs: np.ndarray) -> np.ndarray:
        """One batch, in the calling thread (infer's worker; the start-up measurement)."""
        requests = self._local.__dict__.setdefault("requests", {})
        if model not in requests:
            requests[model] = self._models[model].create_infer_request()
        request = requests[model]
        request.infer({0: inputs})
        return request.get_output_tensor(0).data.copy()

    async def infer(self, model: str, inputs: np.ndarray) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.run, model, inputs)

    async def ready(self) -> bool:
        return bool(self._models)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
