"""The engine: what the routes call. Pre-processing on CPU threads, inference through the micro-batchers.

Three steps per input, as in infinity: pre (decode / tokenize, in threads off the event loop), core (the backend,
batched across requests), post (already done in-graph: the towers return L2-normalised embeddings).
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from hqclip.repo.manifest import Manifest, load_manifest
from hqclip.repo.preprocess import ImageError, ImagePreprocessor
from hqclip.repo.tokenizer import load_tokenizer, trim_padding
from services.backends import Backend, create_backend
from services.batcher import MicroBatcher
from services.errors import BadInput, NoTagHead, TooManyInputs
from services.metrics import Metrics
from services.settings import Settings

_LABEL_CACHE_SIZE = 8192


@dataclass
class TextEmbeddings:
    """What the text tower gave for a list of texts."""

    vectors: np.ndarray  # [n, D], L2-normalised
    truncated: list[bool]  # per text: cut to the context length
    tokens: int  # tokens the texts took, start and end markers included (OpenAI's `usage`)


class Engine:
    """One loaded model: its manifest, backend, tokenizer, pre-processing and batchers.

    ``manifest`` defaults to the one the settings name; services/reload.py builds a second engine beside this one
    for a new export and swaps them."""

    def __init__(self, settings: Settings, metrics: Metrics, backend: Backend | None = None,
                 manifest: Manifest | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.manifest: Manifest = manifest or load_manifest(settings.model_repo, settings.model)
        self.fingerprint = self.manifest.fingerprint
        self.backend = backend or create_backend(settings, self.manifest)  # chooses the precision (auto)
        self.image_model, self.text_model = self.manifest.towers(self.backend.precision)
        self.tokenizer = load_tokenizer(self.manifest.text.tokenizer, settings.model_repo)
        self.preprocess = ImagePreprocessor(
            self.manifest.image, settings.limits.max_image_bytes, settings.limits.max_image_pixels
        )
        self._cpu = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="pre")
        self._label_cache: OrderedDict[tuple[str, tuple[str, ...]], np.ndarray] = OrderedDict()
        self._batchers: dict[str, MicroBatcher] = {}

    async def start(self) -> None:
        """Create the batchers on the running loop."""
        batch = self.settings.batch
        largest = self.manifest.max_batch_size  # what the towers take (Triton refuses more)
        shapes = {self.image_model: (self._run_images, min(batch.image_max_size, largest), batch.image_workers),
                  self.text_model: (self._run_texts, min(batch.text_max_size, largest), batch.text_workers)}
        for model, (run, max_size, workers) in shapes.items():
            self._batchers[model] = MicroBatcher(
                model,
                run,
                max_size,
                batch.max_delay_ms / 1000,
                batch.queue_size,
                workers,
                self.metrics,
            )

    async def _run_images(self, pixels: np.ndarray) -> np.ndarray:
        return await self.backend.infer(self.image_model, pixels)

    async def _run_texts(self, ids: np.ndarray) -> np.ndarray:
        """One batch of ids through the text tower, cut after its longest text where the tower allows."""
        if self.manifest.text.any_length:
            ids = trim_padding(ids, self.manifest.text.tokenizer.pad_id)
        return await self.backend.infer(self.text_model, ids)

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        await self.backend.close()
        self._cpu.shutdown(wait=False, cancel_futures=True)

    def _check_fits(self, count: int) -> None:
        """A call larger than the whole queue could never be served: refused now, not a full queue forever."""
        room = self.settings.batch.queue_size
        if count > room:
            raise TooManyInputs(f"{count} items, more than the gateway's queue holds ({room}); split the request")

    async def _in_threads(self, fn, items: list) -> list:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(self._cpu, fn, item) for item in items))

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, list[bool], int]:
        ids, truncated = self.tokenizer(texts)
        return ids, truncated, int((ids != self.manifest.text.tokenizer.pad_id).sum())

    async def embed_texts(self, texts: list[str]) -> TextEmbeddings:
        """L2-normalised embeddings, which texts were cut to the context length, and the tokens they took."""
        self._check_fits(len(texts))
        limit = self.settings.limits.max_text_chars
        for i, text in enumerate(texts):
            if len(text) > limit:
                raise BadInput(f"{len(text)} characters, more than the limit of {limit}", i)
        ids, truncated, tokens = await asyncio.get_running_loop().run_in_executor(self._cpu, self._tokenize, texts)
        self.metrics.items.labels("text").inc(len(texts))
        return TextEmbeddings(await self._batchers[self.text_model].submit(ids), truncated, tokens)

    def _decode(self, item: tuple[int, bytes]) -> np.ndarray:
        index, data = item
        try:
            return self.preprocess(data)
        except ImageError as exc:
            raise BadInput(str(exc), index) from None

    async def pixels(self, images: list[bytes]) -> np.ndarray:
        """Decoded, resized, cropped uint8 [n, 3, H, W], each image in a thread off the event loop."""
        return np.stack(await self._in_threads(self._decode, list(enumerate(images))))

    async def embed_images(self, images: list[bytes]) -> np.ndarray:
        """L2-normalised embeddings [n, D] of encoded images (JPEG, PNG, WebP, ...)."""
        self._check_fits(len(images))
        pixels = await self.pixels(images)
        self.metrics.items.labels("image").inc(len(images))
        return await self._batchers[self.image_model].submit(pixels)

    async def tag_probabilities(self, image_embeddings: np.ndarray) -> np.ndarray:
        """Per-tag probabilities [n, V] from the short-tag head."""
        if self.manifest.tags is None:
            raise NoTagHead(f"model '{self.manifest.name}' has no tag head; export a model trained with "
                            "short-tag classification (`hqclip train` with lambda_stc > 0)")
        return await self.backend.infer(self.manifest.tags.model, image_embeddings.astype(np.float32))

    async def label_embeddings(self, labels: list[str], templates: tuple[str, ...]) -> np.ndarray:
        """One embedding per label: the normalised mean over its prompts, cached per (label, templates).

        Prompts go to the batcher a batch at a time, so a thousand labels times seven templates fit any queue."""
        missing = [label for label in dict.fromkeys(labels) if (label, templates) not in self._label_cache]
        if missing:
            prompts = [template.format(label) for label in missing for template in templates]
            step = min(self.settings.batch.text_max_size, self.settings.batch.queue_size)
            chunks = []
            for i in range(0, len(prompts), step):
                try:
                    chunks.append((await self.embed_texts(prompts[i : i + step])).vectors)
                except BadInput as exc:  # name the label, not its prompt
                    raise BadInput(exc.reason, labels.index(missing[(i + exc.index) // len(templates)])) from None
            embeddings = np.concatenate(chunks)
            per_label = embeddings.reshape(len(missing), len(templates), -1).mean(axis=1)
            per_label /= np.linalg.norm(per_label, axis=1, keepdims=True)
            for label, vector in zip(missing, per_label):
                self._label_cache[(label, templates)] = vector
                if len(self._label_cache) > _LABEL_CACHE_SIZE:
                    self._label_cache.popitem(last=False)
        for label in labels:
            self._label_cache.move_to_end((label, templates))
        return np.stack([self._label_cache[(label, templates)] for label in labels])

    def logits(self, image_embeddings: np.ndarray, label_embeddings: np.ndarray) -> np.ndarray:
        """The model's own scaled similarities (learned logit scale and bias; never a hard-coded 100)."""
        logits = self.manifest.logit_scale * image_embeddings @ label_embeddings.T
        if self.manifest.logit_bias is not None:
            logits += self.manifest.logit_bias
        return logits

    async def ready(self) -> bool:
        """A real inference on a tiny input succeeds end to end, through every model the engine runs."""
        if not await self.backend.ready():
            return False
        await self.embed_texts(["ready"])
        pixels = np.zeros((1, 3, *self.manifest.image.size), dtype=np.uint8)
        embeddings = await self._batchers[self.image_model].submit(pixels)
        if self.manifest.tags is not None:
            await self.tag_probabilities(embeddings)
        return True
