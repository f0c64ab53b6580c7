"""Triton Inference Server over gRPC (asyncio): the models run on Triton's GPUs, the gateway only sends tensors.

Tensors travel as raw binary (images as uint8 pixels, a quarter of float32). Model, input and output names come
from the manifest, exactly as ``hqclip export`` laid out the repository Triton loads. When Triton goes away, calls
raise ``BackendUnavailable`` (503, ``/ready`` false) and the channel is dropped; the next call opens a fresh one,
so the gateway serves again as soon as Triton is back, without a restart.
"""

from __future__ import annotations

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from hqclip.repo.manifest import Manifest
from services.backends.base import Backend, BackendUnavailable
from services.settings import Settings

# gRPC statuses that mean "Triton cannot serve this now", as opposed to a bad request.
_OUTAGE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.NOT_FOUND"}
# Batches of 256 images are ~38 MB; and with a URL like dns:///triton:8001 that resolves to several Triton servers,
# calls go round-robin to every one that is up.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.lb_policy_name", "round_robin"),
]


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, settings: Settings, manifest: Manifest) -> None:
        self._settings = settings.triton
        image, text = manifest.towers(settings.precision)
        self._outputs = {image: manifest.image.output, text: manifest.text.output}
        self._inputs = {image: manifest.image.input, text: manifest.text.input}
        if manifest.tags:
            self._outputs[manifest.tags.model] = manifest.tags.output
            self._inputs[manifest.tags.model] = manifest.tags.input
        self._client: grpcclient.InferenceServerClient | None = None

    def _connect(self) -> grpcclient.InferenceServerClient:
        # Created lazily: a grpc.aio channel belongs to the event loop that first uses it.
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self._settings.url, channel_args=_CHANNEL_ARGS)
        return self._client

    async def _drop(self, client: grpcclient.InferenceServerClient) -> None:
        """Forget a channel that failed, so the next call reconnects (unless another call did already)."""
        if self._client is client:
            self._client = None
            await client.close()

    async def infer(self, model: str, inputs: np.ndarray) -> np.ndarray:
        client = self._connect()
        request = grpcclient.InferInput(self._inputs[model], list(inputs.shape), np_to_triton_dtype(inputs.dtype))
        request.set_data_from_numpy(np.ascontiguousarray(inputs))
        output = self._outputs[model]
        try:
            result = await client.infer(
                model,
                [request],
                outputs=[grpcclient.InferRequestedOutput(output)],
                client_timeout=self._settings.timeout_s,
            )
        except InferenceServerException as exc:
            if exc.status() not in _OUTAGE:
                raise
            if exc.status() == "StatusCode.UNAVAILABLE":
                await self._drop(client)
            raise BackendUnavailable(
                f"Triton at {self._settings.url}: {exc.message()} "
                "(is tritonserver up, serving the model repository `hqclip export` wrote?)"
            ) from None
        return result.as_numpy(output)

    async def ready(self) -> bool:
        client = self._connect()
        timeout = self._settings.ready_timeout_s
        try:
            if not await client.is_server_ready(client_timeout=timeout):
                return False
            for model in self._outputs:
                if not await client.is_model_ready(model, client_timeout=timeout):
                    return False
        except InferenceServerException as exc:
            if exc.status() == "StatusCode.UNAVAILABLE":
                await self._drop(client)
            return False
        return True

    async def close(self) -> None:
        if self._client is not None:
            await self._drop(self._client)
