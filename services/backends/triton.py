"""Triton Inference Server over gRPC (asyncio): the models run on Triton's GPUs, the gateway only sends tensors.

Tensors travel as raw binary (images as uint8 pixels, a quarter of float32). Model, input and output names come
from the manifest, exactly as ``hqclip export`` laid out the repository Triton loads. When Triton goes away, calls
raise ``BackendUnavailable`` (503, ``/ready`` false) and the channel is dropped; the next call opens a fresh one,
so the gateway serves again as soon as Triton is back, without a restart.

Hot swap (services/reload.py) with Triton in ``--model-control-mode=explicit``: each request names the version of
its model that the manifest's files put it in (``<model>/<version>/model.onnx``), so a backend built for a new
export talks only to the new versions. ``prepare`` loads them beside the versions Triton serves (``load_model`` with
the model's own config and a ``specific`` version policy); ``release``, once the swap is done and the old requests
have finished, leaves loaded only the versions still in use. A version that fails to load leaves the old ones
serving: Triton keeps a model's loaded versions when a reload of it fails.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from hqclip.repo.layout import onnx_path
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
log = logging.getLogger("hqclip.triton")


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
        self._versions = {model: str(manifest.version(model)) for model in self._outputs}
        self._files = {model: manifest.files.get(onnx_path(Path(), model, int(version)).as_posix())
                       for model, version in self._versions.items()}
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
                model_version=self._versions[model],
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
            for model, version in self._versions.items():
                if not await client.is_model_ready(model, version, client_timeout=timeout):
                    return False
        except InferenceServerException as exc:
            if exc.status() == "StatusCode.UNAVAILABLE":
                await self._drop(client)
            return False
        return True

    async def _loaded(self, model: str) -> set[str]:
        index = await self._connect().get_model_repository_index(as_json=True)
        return {entry["version"] for entry in index.get("models", [])
                if entry["name"] == model and entry.get("state") == "READY" and "version" in entry}

    async def _serve_versions(self, model: str, versions: set[str]) -> None:
        """Have Triton serve exactly ``versions`` of ``model`` (its own config, another version policy)."""
        client = self._connect()
        config = (await client.get_model_config(model, as_json=True))["config"]
        config["version_policy"] = {"specific": {"versions": sorted(versions, key=int)}}
        await client.load_model(model, config=json.dumps(config))

    async def prepare(self, previous: Backend) -> None:
        """Load this export's versions beside those Triton serves; a clear error when Triton cannot, or when a
        changed model comes as the version Triton already serves (Triton would answer with its old weights)."""
        for model, version in self._versions.items():
            if (isinstance(previous, TritonBackend) and previous._versions.get(model) == version
                    and previous._files.get(model) != self._files[model]):
                raise RuntimeError(f"the new {model} is version {version}, the version Triton serves now, which would "
                                   f"keep answering with the old weights: publish it as a new version folder "
                                   f"({model}/{int(version) + 1}/: `hqclip export --version next`, docs/deploy.md)")
            try:
                if await self._connect().is_model_ready(model, version):
                    continue
                await self._serve_versions(model, await self._loaded(model) | {version})
            except InferenceServerException as exc:
                if exc.status() == "StatusCode.UNAVAILABLE":
                    raise BackendUnavailable(f"Triton at {self._settings.url}: {exc.message()}") from None
                raise RuntimeError(f"Triton could not load version {version} of {model}: {exc.message()}") from None

    async def release(self) -> None:
        """Unload the versions only this backend used (never a model's last one)."""
        for model, version in self._versions.items():
            try:
                keep = await self._loaded(model) - {version}
                if keep:
                    await self._serve_versions(model, keep)
            except InferenceServerException as exc:
                log.warning("version %s of %s stays loaded: %s", version, model, exc.message())

    async def close(self) -> None:
        if self._client is not None:
            await self._drop(self._client)
