"""Serve a model repository's ONNX models from a real Triton server, for the tests.

Runs inside the virtualenv of tests/servers/triton_env.sh (nvidia-pytriton needs numpy<2). pytriton bundles a
real ``tritonserver`` with the Python backend only, so each model of the manifest becomes a bound function that
runs the exported ``<model>/1/model.onnx`` with ONNX Runtime, under the manifest's model, input and output names,
with dynamic batching on. The gateway talks to it over gRPC exactly as it would to a GPU Triton.

    build/venvs/triton/bin/python tests/servers/triton_serve.py --model-repo model_repo --grpc-port 8001

With ``--triton-repo DIR`` the models are not bound functions but Triton's own: the repository's version folders
are mirrored into DIR as Python-backend models (tests/servers/triton_mirror.py) and tritonserver loads them itself in
``--model-control-mode=explicit``, so clients can load, pin and unload model versions (the hot-swap tests). Versions
exported later are mirrored by the test (``TritonServer.mirror``) before a client loads them.

Stops cleanly on SIGTERM or SIGINT: tritonserver and its Python-backend stubs exit with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import sysconfig
import threading
from pathlib import Path

# The Python-backend stub is linked against libpython3.x.so; with a system libpython on the loader's path it can
# load that one instead of this interpreter's. Put this interpreter's library folder first, before tritonserver
# (and the stubs it spawns) inherit the environment.
_LIBDIR = sysconfig.get_config_var("LIBDIR")
if _LIBDIR:
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [_LIBDIR, os.environ.get("LD_LIBRARY_PATH")]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from pytriton.decorators import batch  # noqa: E402
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # noqa: E402
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig  # noqa: E402
from triton_mirror import mirror  # noqa: E402 (stdlib only; this script's folder is on sys.path)

MANIFEST_SUFFIX = ".manifest.json"
ORT_TYPES = {"tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(float)": np.float32}
LOG = logging.getLogger("triton_serve")


def find_manifest(repo: Path, name: str | None) -> dict:
    """The manifest's JSON (read as plain JSON: this venv has numpy<2 and none of the services' packages)."""
    paths = [repo / f"{name}{MANIFEST_SUFFIX}"] if name else sorted(repo.glob(f"*{MANIFEST_SUFFIX}"))
    if len(paths) != 1 or not paths[0].is_file():
        sys.exit(f"need exactly one manifest in {repo} (found {[p.name for p in paths]}); pass --model")
    return json.loads(paths[0].read_text())


def served_models(manifest: dict) -> list[tuple[str, str, str]]:
    """(model, input, output) of every tower the manifest names, reduced-precision variants included."""
    models = [(manifest[p]["model"], manifest[p]["input"], manifest[p]["output"]) for p in ("image", "text")]
    if manifest.get("tags"):
        models.append((manifest["tags"]["model"], manifest["tags"]["input"], manifest["tags"]["output"]))
    for variant in manifest.get("variants", {}).values():
        models.append((variant["image_model"], manifest["image"]["input"], manifest["image"]["output"]))
        models.append((variant["text_model"], manifest["text"]["input"], manifest["text"]["output"]))
    return models


def bind_model(triton: Triton, repo: Path, model: str, input_name: str, output_name: str, args) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    (onnx_in,), (onnx_out,) = session.get_inputs(), session.get_outputs()
    if (onnx_in.name, onnx_out.name) != (input_name, output_name):
        sys.exit(f"{model}: the ONNX graph has {onnx_in.name}->{onnx_out.name}, "
                 f"the manifest {input_name}->{output_name}")

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {output_name: session.run([output_name], {input_name: inputs[input_name]})[0]}

    # Shapes without the batch axis; a dynamic axis (a name or None) becomes -1.
    def dims(shape: list) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in shape[1:])

    triton.bind(
        model_name=model,
        infer_func=infer,
        inputs=[Tensor(name=input_name, dtype=ORT_TYPES[onnx_in.type], shape=dims(onnx_in.shape))],
        outputs=[Tensor(name=output_name, dtype=ORT_TYPES[onnx_out.type], shape=dims(onnx_out.shape))],
        config=ModelConfig(
            max_batch_size=args.max_batch_size,
            batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
        ),
        strict=True,
    )
    LOG.info("bound %s: %s%s -> %s", model, input_name, dims(onnx_in.shape), output_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repo", type=Path, required=True, help="Repository `hqclip export` wrote.")
    parser.add_argument("--model", default=None, help="Model name in the repository; default: the only one.")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=None, help="Default: the manifest's.")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="Dynamic batcher's queue delay.")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per model.")
    parser.add_argument("--triton-repo", type=Path, default=None,
                        help="Serve the repository's versions as Triton's own models, mirrored into this folder.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    manifest = find_manifest(args.model_repo, args.model)
    args.max_batch_size = args.max_batch_size or manifest["max_batch_size"]
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    config = TritonConfig(
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        exit_timeout_secs=5,
        model_repository=args.triton_repo,
    )
    # explicit mode: the model-repository API (load, unload) open to clients, as on a plain tritonserver
    triton = Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[]) if args.triton_repo
                    else None)
    try:
        if args.triton_repo:
            LOG.info("mirrored %s", mirror(args.model_repo, args.triton_repo))
        for model, input_name, output_name in served_models(manifest) if not args.triton_repo else ():
            bind_model(triton, args.model_repo, model, input_name, output_name, args)
        triton.run()  # starts tritonserver and waits until every model is ready
        LOG.info("serving %s on grpc :%d, http :%d", manifest["name"], args.grpc_port, args.http_port)
        while not stop.wait(0.5):
            if not triton.is_alive():
                sys.exit("tritonserver exited; see its log above")
    finally:
        triton.stop()  # SIGINT to tritonserver, waits for it, removes the workspace
        LOG.info("stopped")


if __name__ == "__main__":
    main()
