"""``config.pbtxt`` for one model of the Triton model repository, and how Triton should run it.

With ``max_batch_size > 0`` Triton adds the batch axis itself: ``dims`` list the shape of ONE item, and the full
tensor is ``[-1] + dims`` (the ONNX graphs' dynamic batch axis). See Triton's model_configuration.md.

Three ways to run a tower (``TritonOptions.tensorrt``), chosen at export:
- ``none``: Triton's onnxruntime backend on CUDA (or CPU).
- ``accelerator``: the same ONNX file, with ONNX Runtime's TensorRT execution provider as Triton's GPU execution
  accelerator; engines are built on first load and cached (``tensorrt_cache``).
- ``plan``: a TensorRT engine that ``trtexec`` builds ahead of time, inside NVIDIA's TensorRT container of the
  same release as tritonserver (``docker compose --profile tensorrt``), from the script written next to the
  config (``build_tensorrt_plan.sh``); the config is for Triton's ``tensorrt_plan`` platform.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import numpy as np

TRITON_DTYPES = {
    np.dtype(np.uint8): "TYPE_UINT8",
    np.dtype(np.int64): "TYPE_INT64",
    np.dtype(np.float32): "TYPE_FP32",
    np.dtype(np.float16): "TYPE_FP16",
}
PLAN_SCRIPT = "build_tensorrt_plan.sh"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # one item's shape, without the batch axis; -1: any size up to ``largest``'s
    largest: tuple[int, ...] | None = None  # the largest item, where dims has a -1 (TensorRT builds up to it)

    def pbtxt(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        data_type = TRITON_DTYPES[np.dtype(self.dtype)]
        return f'  {{\n    name: "{self.name}"\n    data_type: {data_type}\n    dims: [ {dims} ]\n  }}'

    def shape(self, batch: int, smallest: bool = False) -> str:
        """trtexec's shape syntax: ``name:BxD1xD2``; a variable axis at 1 (``smallest``) or at its largest size."""
        dims = tuple(1 if d == -1 else d for d in self.dims) if smallest else self.largest or self.dims
        return f"{self.name}:" + "x".join(str(d) for d in (batch, *dims))


@dataclass(frozen=True)
class TritonOptions:
    """How Triton runs each exported model (the ``hqclip export --triton-*`` and ``--tensorrt*`` options)."""

    device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: Triton's KIND_AUTO (the GPUs when it sees any)
    instances: int = 1  # model instances per GPU (or on the CPU)
    preferred_batch_sizes: tuple[int, ...] = ()  # empty: half the max batch size and the max batch size
    max_queue_delay_us: int = 500  # how long Triton's dynamic batcher waits to fill a preferred batch
    tensorrt: Literal["none", "accelerator", "plan"] = "none"
    tensorrt_precision: Literal["fp16", "fp32"] = "fp16"
    tensorrt_workspace_gb: float = 4.0
    tensorrt_cache: str = "/trt_cache"  # accelerator: engine cache inside the Triton container (a volume)

    def __post_init__(self) -> None:
        for field, kind in get_type_hints(TritonOptions).items():
            if get_origin(kind) is Literal and getattr(self, field) not in get_args(kind):
                raise ValueError(f"{field} is {getattr(self, field)!r}; choose one of {', '.join(get_args(kind))}")
        if self.instances < 1 or self.max_queue_delay_us < 0:
            raise ValueError("instances must be >= 1 and max_queue_delay_us >= 0")
        if self.tensorrt != "none" and self.device == "cpu":
            raise ValueError("TensorRT runs on GPUs: use --triton-device gpu or auto with --tensorrt")

    def preferred(self, max_batch_size: int) -> list[int]:
        sizes = self.preferred_batch_sizes or (max_batch_size // 2, max_batch_size)
        if any(size > max_batch_size for size in sizes):
            raise ValueError(f"preferred batch sizes {sizes} exceed the max batch size {max_batch_size}")
        return sorted({size for size in sizes if size >= 1})


def _instance_group(options: TritonOptions) -> str:
    kind = {"auto": "", "gpu": "\n    kind: KIND_GPU", "cpu": "\n    kind: KIND_CPU"}[options.device]
    return f"instance_group [\n  {{\n    count: {options.instances}{kind}\n  }}\n]"


def _tensorrt_accelerator(name: str, options: TritonOptions) -> str:
    parameters = {
        "precision_mode": options.tensorrt_precision.upper(),
        "max_workspace_size_bytes": str(int(options.tensorrt_workspace_gb * (1 << 30))),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": f"{options.tensorrt_cache.rstrip('/')}/{name}",
    }
    lines = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in parameters.items())
    return ("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            f'        name: "tensorrt"\n{lines}\n      }}\n    ]\n  }}\n}}')


def triton_config(name: str, inputs: list[Tensor], outputs: list[Tensor], max_batch_size: int,
                  options: TritonOptions = TritonOptions()) -> str:
    """The text of one model's config.pbtxt: platform, tensors, dynamic batching, instances, accelerator."""
    if options.tensorrt == "plan":
        platform = ['platform: "tensorrt_plan"']
    else:
        platform = ['platform: "onnxruntime_onnx"', 'backend: "onnxruntime"']
    preferred = ", ".join(str(size) for size in options.preferred(max_batch_size))
    sections = [
        f'name: "{name}"',
        *platform,
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(t.pbtxt() for t in inputs) + "\n]",
        "output [\n" + ",\n".join(t.pbtxt() for t in outputs) + "\n]",
        f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}",
        _instance_group(options),
    ]
    if options.tensorrt == "accelerator":
        sections.append(_tensorrt_accelerator(name, options))
    return "\n".join(sections) + "\n"


def plan_script(name: str, inputs: list[Tensor], max_batch_size: int, options: TritonOptions) -> str:
    """A bash script that builds ``1/model.plan`` from ``1/model.onnx`` with trtexec (skipped when up to date)."""
    optimal = options.preferred(max_batch_size)[-1]
    shapes = {"min": 1, "opt": optimal, "max": max_batch_size}
    shape_args = " ".join(f"--{k}Shapes={','.join(t.shape(b, smallest=k == 'min') for t in inputs)}"
                          for k, b in shapes.items())
    precision = " --fp16" if options.tensorrt_precision == "fp16" else ""
    workspace_mib = int(options.tensorrt_workspace_gb * 1024)
    return f"""#!/usr/bin/env bash
# Written by `hqclip export --tensorrt plan`. Builds this model's TensorRT engine for the GPU it runs on; run it
# in nvcr.io/nvidia/tensorrt of the same release as tritonserver (`docker compose --profile tensorrt up`).
set -euo pipefail
cd "$(dirname "$0")/1"
if [ model.plan -nt model.onnx ]; then
    echo "{name}: model.plan is newer than model.onnx, nothing to build"
    exit 0
fi
trtexec --onnx=model.onnx --saveEngine=model.plan.partial{precision} --memPoolSize=workspace:{workspace_mib}M \\
    {shape_args}
mv model.plan.partial model.plan
echo "{name}: built model.plan"
"""


def write_triton_config(folder: Path, name: str, inputs: list[Tensor], outputs: list[Tensor],
                        max_batch_size: int, options: TritonOptions = TritonOptions()) -> Path:
    """Write ``folder/config.pbtxt`` (and, for TensorRT plans, ``folder/build_tensorrt_plan.sh``)."""
    folder = Path(folder)
    path = folder / "config.pbtxt"
    path.write_text(triton_config(name, inputs, outputs, max_batch_size, options))
    if options.tensorrt == "plan":
        script = folder / PLAN_SCRIPT
        script.write_text(plan_script(name, inputs, max_batch_size, options))
        script.chmod(0o755)
    return path
