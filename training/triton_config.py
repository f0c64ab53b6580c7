"""``config.pbtxt`` for one ONNX model of the Triton model repository.

With ``max_batch_size > 0`` Triton adds the batch axis itself: ``dims`` list the shape of ONE item, and the full
tensor is ``[-1] + dims`` (the ONNX graphs' dynamic batch axis). See Triton's model_configuration.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRITON_DTYPES = {
    np.dtype(np.uint8): "TYPE_UINT8",
    np.dtype(np.int64): "TYPE_INT64",
    np.dtype(np.float32): "TYPE_FP32",
    np.dtype(np.float16): "TYPE_FP16",
}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # one item's shape, without the batch axis

    def pbtxt(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        return f'  {{\n    name: "{self.name}"\n    data_type: {TRITON_DTYPES[np.dtype(self.dtype)]}\n    dims: [ {dims} ]\n  }}'


def triton_config(name: str, inputs: list[Tensor], outputs: list[Tensor], max_batch_size: int,
                  max_queue_delay_us: int = 0) -> str:
    """The text of an onnxruntime model's config.pbtxt with dynamic batching."""
    return "\n".join([
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(t.pbtxt() for t in inputs) + "\n]",
        "output [\n" + ",\n".join(t.pbtxt() for t in outputs) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
        "",
    ])


def write_triton_config(folder: Path, name: str, inputs: list[Tensor], outputs: list[Tensor],
                        max_batch_size: int) -> Path:
    path = Path(folder) / "config.pbtxt"
    path.write_text(triton_config(name, inputs, outputs, max_batch_size))
    return path
