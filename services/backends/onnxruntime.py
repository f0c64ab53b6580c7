"""In-process ONNX Runtime: the embedded default backend."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from hqclip.repo.layout import onnx_path
from services.backends.base import Backend, Load
from services.settings import Settings


def session_options(settings: Settings, text_tower: bool) -> ort.SessionOptions:
    """The gateway's options for one session (benchmarks/gateway_bench.py uses the same)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.ort_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spinning = settings.ort_spinning == "all" or (settings.ort_spinning == "text" and text_tower)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, settings: Settings, loads: list[Load]) -> None:
        # ONNX Runtime computes what the file says: an int8 variant's QDQ graph in int8, fp32 in fp32.
        self._sessions = {
            load.model: ort.InferenceSession(str(onnx_path(settings.model_repo, load.model, load.version)),
                                             session_options(settings, text_tower=load.text),
                                             providers=["CPUExecutionProvider"])
            for load in loads
        }
        # ONNX Runtime releases the GIL while it runs, so a few threads overlap batches with decoding.
        self._pool = ThreadPoolExecutor(max_workers=settings.batch.text_workers + settings.batch.image_workers,
                                        thread_name_prefix="ort")

    def run(self, model: str, inputs: np.ndarray) -> np.ndarray:
        """One batch, in the calling thread (infer's worker; the start-up measurement)."""
        session = self._sessions[model]
        return session.run(None, {session.get_inputs()[0].name: inputs})[0]

    async def infer(self, model: str, inputs: np.ndarray) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.run, model, inputs)

    async def ready(self) -> bool:
        return bool(self._sessions)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
