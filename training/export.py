"""``hqclip export``: an open_clip model -> a Triton model repository the services can serve.

Writes, for a model ``<name>`` (the contract is model_repo/README.md and hqclip/repo/manifest.py):
    <out>/<name>_image/1/model.onnx + config.pbtxt      uint8 pixels -> L2-normalised embeddings
    <out>/<name>_text/1/model.onnx + config.pbtxt       int64 ids -> L2-normalised embeddings (+ tokenizer file)
    <out>/<name>_tags/1/model.onnx + config.pbtxt       image embeddings -> tag probabilities (with a tag head)
    <out>/<name>.manifest.json
With ``version`` (``hqclip export --version next``) the towers go into ``<model>/<version>/`` beside the versions
there instead of replacing the model folders, the manifest names the new ones, and after it is in place the
versions past the newest ``keep_versions`` are deleted: a gateway reloads (Triton loads the new version beside the
old, docs/deploy.md) without a restart.
Everything is built in a temporary folder next to ``<out>`` and checked with ONNX Runtime against the torch
forward (batch 1 and 7) before it is moved in, the manifest last: a failed export changes nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import platform
import re
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from hqclip.repo import layout
from hqclip.repo.install import install, prune_versions, staging
from hqclip.repo.manifest import ImageSpec, Manifest, TagSpec, TextSpec, TokenizerSpec, load_manifest, sha256_file
from hqclip.repo.tokenizer import load_tokenizer, trim_padding
from hqclip.repo.triton_config import Tensor, TritonOptions, write_triton_config
from training.models import TokenizerInfo, load_model, logit_scale_and_bias, tokenizer_info
from training.onnx_towers import (
    EMBEDDINGS_OUTPUT,
    IMAGE_INPUT,
    TAGS_INPUT,
    TAGS_OUTPUT,
    TEXT_INPUT,
    ImageTower,
    TagTower,
    TextTower,
)

DEFAULT_OPSET = 17
MIN_COSINE = 0.999  # the export-time sanity check on random inputs; the tests hold real inputs to 0.9999
CHECK_TEXTS = ["a photo of a cat", "a diagram of a rocket engine", "two dogs playing in the snow", "",
               "a close-up photo of a cup of coffee on a wooden table", "an astronaut", "Tokyo at night 東京"]


def default_name(model: str) -> str:
    """A Triton-safe model name from a model name, folder or hub id: ``ViT-B-16`` -> ``vit-b-16``."""
    stem = Path(model.removeprefix("hf-hub:").rstrip("/")).name
    return re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-") or "model"


@contextlib.contextmanager
def _mha_fastpath_disabled():
    """PyTorch's fused MHA fast path exports as ``aten::_native_multi_head_attention``, which ONNX lacks."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                 opset: int, any_length: bool = False) -> tuple[int, ...]:
    """Trace ``module`` on ``example`` into ``path`` with a dynamic batch axis; the output's item shape.

    ``any_length``: the input's second axis (a text's tokens) is dynamic too. The TorchScript tracer fixes it inside
    ``nn.MultiheadAttention`` (the key's length becomes a constant), so that export goes through ``torch.export``
    (the dynamo exporter), at opset 18 or above, the lowest it writes without a version conversion.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _mha_fastpath_disabled(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter about the TorchScript exporter
        if any_length:
            axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=example.shape[1])}
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                torch.onnx.export(module.eval(), (example,), str(path), input_names=[input_name],
                                  output_names=[output_name], dynamic_shapes=(axes,), opset_version=max(opset, 18),
                                  dynamo=True, external_data=False)
        else:
            torch.onnx.export(
                module.eval(), (example,), str(path), input_names=[input_name], output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=opset, dynamo=False,
            )
        item_shape = tuple(module(example).shape[1:])
    _set_output_shape(path, item_shape)
    return item_shape


def _set_output_shape(path: Path, item_shape: tuple[int, ...]) -> None:
    """Declare the output's static item shape (the tracer leaves e.g. the embedding width symbolic after the
    L2 normalisation), so the graph states what config.pbtxt says."""
    import onnx

    graph_model = onnx.load(str(path))
    dims = graph_model.graph.output[0].type.tensor_type.shape.dim
    for dim, size in zip(dims[1:], item_shape, strict=True):
        dim.dim_value = int(size)
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))


def _check_parity(module: nn.Module, path: Path, inputs: list[np.ndarray], what: str) -> None:
    """ONNX Runtime vs torch on each input: the export fails unless every row's cosine >= MIN_COSINE."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    for array in inputs:
        got = session.run(None, {input_name: array})[0]
        with torch.no_grad(), _mha_fastpath_disabled():
            want = module(torch.from_numpy(array)).numpy()
        if got.shape != want.shape:
            raise RuntimeError(f"{what}: ONNX output {got.shape} for input {array.shape}, torch {want.shape}")
        cosine = (got * want).sum(-1) / np.maximum(np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1),
                                                   1e-12)
        if cosine.min() < MIN_COSINE:
            raise RuntimeError(f"{what}: ONNX differs from torch for input {array.shape} (cosine "
                               f"{cosine.min():.6f}); try another --opset, or report the model")


def _image_spec(preprocess_cfg: dict, name: str) -> ImageSpec:
    size = preprocess_cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    mean, std = preprocess_cfg["mean"], preprocess_cfg["std"]
    mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3
    std = tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3
    resize_mode = preprocess_cfg.get("resize_mode") or "shortest"
    interpolation = preprocess_cfg.get("interpolation") or "bicubic"
    if interpolation == "random" or (resize_mode == "shortest" and height != width):
        interpolation = "bicubic"  # what open_clip's eval transform really uses in these cases
    return ImageSpec(model=layout.image_model(name), input=IMAGE_INPUT, output=EMBEDDINGS_OUTPUT, size=(height, width),
                     resize_mode=resize_mode, interpolation=interpolation,
                     fill_color=int(preprocess_cfg.get("fill_color", 0)), mean=mean, std=std)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("hqclip", "torch", "open_clip_torch", "timm", "transformers", "onnx", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def export_model(
    model: nn.Module,
    preprocess_cfg: dict,
    tokenizer_info: TokenizerInfo,
    out: Path,
    name: str,
    weights_desc: str,
    tag_head: nn.Module | None = None,
    tag_vocab: list[str] | None = None,
    *,
    architecture: str = "custom",
    description: str = "",
    max_batch_size: int = 32,
    opset: int = DEFAULT_OPSET,
    triton: TritonOptions = TritonOptions(),
    version: int | str | None = None,
    keep_versions: int = 2,
) -> Path:
    """Export an in-memory open_clip model (and optional tag head) into the repository ``out``.

    ``preprocess_cfg`` is open_clip's (``open_clip.get_model_preprocess_cfg(model)``: size, mean, std,
    interpolation, resize_mode, fill_color); ``tokenizer_info`` comes from ``training.models.tokenizer_info``.
    ``tag_head`` maps image embeddings [B, D] to logits [B, len(tag_vocab)]. Returns the manifest's path.
    ``version``: None replaces the model's folders with version 1; a number, or ``"next"`` (one past the newest
    version in ``out``), installs beside the versions there, keeping the newest ``keep_versions``.
    """
    if (tag_head is None) != (tag_vocab is None):
        raise ValueError("give both tag_head and tag_vocab, or neither")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"model name '{name}' must use only letters, digits, '_' and '-' (it names Triton models)")
    out = Path(out).resolve()
    number = layout.VERSION if version is None else resolve_version(out, name, version)
    model = model.eval()
    image_spec = _image_spec(preprocess_cfg, name)
    batches = sorted({1, min(7, max_batch_size)})  # traced at 1; another size proves the batch axis is dynamic
    console = Console(stderr=True)
    with staging(out, name) as stage:
        console.log(f"{name}: exporting the text tower, checking it at batch {batches}")
        text_dir = stage / layout.text_model(name)
        text_dir.mkdir()
        tokenizer_file = f"{text_dir.name}/{tokenizer_info.save(text_dir)}"
        tokenizer_spec = TokenizerSpec(kind=tokenizer_info.kind, file=tokenizer_file,
                                       context_length=tokenizer_info.context_length, clean=tokenizer_info.clean,
                                       pad_id=tokenizer_info.pad_id)
        tokenizer = load_tokenizer(tokenizer_spec, stage)
        texts = [tokenizer([CHECK_TEXTS[i % len(CHECK_TEXTS)] for i in range(b)])[0] for b in batches]
        text_tower = TextTower(model)
        example = tokenizer(CHECK_TEXTS[:2])[0]  # torch.export fixes an axis it sees at size 1: trace at batch 2
        export_onnx(text_tower, torch.from_numpy(example), layout.onnx_path(stage, text_dir.name, number),
                     TEXT_INPUT, EMBEDDINGS_OUTPUT, opset, text_tower.any_length)
        if text_tower.any_length:  # and at the lengths the services cut batches to
            texts += [trim_padding(ids, tokenizer_spec.pad_id) for ids in texts]
        _check_parity(text_tower, layout.onnx_path(stage, text_dir.name, number), texts, "text tower")

        console.log(f"{name}: exporting the image tower, checking it at batch {batches}")
        image_dir = stage / image_spec.model
        height, width = image_spec.size
        rng = np.random.default_rng(0)
        pixels = [rng.integers(0, 256, (b, 3, height, width), dtype=np.uint8) for b in batches]
        image_tower = ImageTower(model, image_spec.mean, image_spec.std)
        (embed_dim,) = export_onnx(image_tower, torch.from_numpy(pixels[0]),
                                    layout.onnx_path(stage, image_dir.name, number), IMAGE_INPUT, EMBEDDINGS_OUTPUT,
                                    opset)
        _check_parity(image_tower, layout.onnx_path(stage, image_dir.name, number), pixels, "image tower")
        embedding = Tensor(EMBEDDINGS_OUTPUT, np.float32, (embed_dim,))
        write_triton_config(image_dir, image_spec.model, [Tensor(IMAGE_INPUT, np.uint8, (3, height, width))],
                            [embedding], max_batch_size, triton)
        context = tokenizer_spec.context_length
        ids = Tensor(TEXT_INPUT, np.int64, (-1,) if text_tower.any_length else (context,), largest=(context,))
        write_triton_config(text_dir, text_dir.name, [ids], [embedding], max_batch_size, triton)

        tags = None
        if tag_head is not None:
            console.log(f"{name}: exporting the tag head ({len(tag_vocab)} tags)")
            tags_dir = stage / layout.tags_model(name)
            tag_tower = TagTower(tag_head.eval())
            embeddings = [rng.standard_normal((b, embed_dim), dtype=np.float32) for b in batches]
            export_onnx(tag_tower, torch.from_numpy(embeddings[0]), layout.onnx_path(stage, tags_dir.name, number),
                         TAGS_INPUT, TAGS_OUTPUT, opset)
            _check_parity(tag_tower, layout.onnx_path(stage, tags_dir.name, number), embeddings, "tag head")
            write_triton_config(tags_dir, tags_dir.name, [Tensor(TAGS_INPUT, np.float32, (embed_dim,))],
                                [Tensor(TAGS_OUTPUT, np.float32, (len(tag_vocab),))], max_batch_size, triton)
            tags = TagSpec(model=tags_dir.name, input=TAGS_INPUT, output=TAGS_OUTPUT, vocabulary=list(tag_vocab))

        logit_scale, logit_bias = logit_scale_and_bias(model)
        manifest = Manifest(
            name=name, architecture=architecture, weights=weights_desc,
            description=description or ("random weights: for tests and demos only, not a trained model"
                                        if weights_desc == "random" else ""),
            embed_dim=embed_dim, logit_scale=logit_scale, logit_bias=logit_bias, max_batch_size=max_batch_size,
            image=image_spec,
            text=TextSpec(model=text_dir.name, input=TEXT_INPUT, output=EMBEDDINGS_OUTPUT, tokenizer=tokenizer_spec,
                          any_length=text_tower.any_length),
            tags=tags,
            created={"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "by": "hqclip export",
                     "opset": str(opset), **_versions()},
        )
        folders = [p.name for p in stage.iterdir() if p.is_dir()]
        removed = _replaced(out, name, folders)
        if version is not None:  # the new version and the model-level files, beside the other versions
            folders = [f"{f}/{p.name}" for f in folders for p in (stage / f).iterdir()
                       if p.is_file() or p.name == str(number)]
        installed = install(out, stage, manifest, folders, remove=removed)
    path = layout.manifest_path(out, name)
    console.log(f"{name}: wrote {path} (version {number})")
    if version is not None:
        for pruned in prune_versions(out, installed, keep_versions):
            console.log(f"{name}: deleted {pruned} (keeping the newest {keep_versions} versions)")
    return path


def resolve_version(repo: Path, name: str, version: int | str) -> int:
    """``version`` as a number: ``"next"`` is one past the newest version of ``name``'s models in ``repo``."""
    if version != "next":
        if not str(version).isdigit() or int(version) < 1:
            raise ValueError(f"version must be a positive number or 'next', not {version!r}")
        return int(version)
    models = (layout.image_model(name), layout.text_model(name), layout.tags_model(name))
    return max((v for model in models for v in layout.versions(repo, model)), default=0) + 1


def _replaced(repo: Path, name: str, folders: list[str]) -> list[str]:
    """What an earlier export of ``name`` has in ``repo`` that the new one does not replace: a tag head the new
    export lacks, the precision variants of the old towers (built from towers that are gone)."""
    old = [layout.tags_model(name)]
    if layout.manifest_path(repo, name).is_file():
        previous = load_manifest(repo, name)
        old += [folder for v in previous.variants.values() for folder in (v.image_model, v.text_model)]
    return [folder for folder in old if folder not in folders]


def export_checkpoint(model: str, pretrained: str | None = None, *, out: Path, name: str | None = None,
                      max_batch_size: int = 32, opset: int = DEFAULT_OPSET,
                      triton: TritonOptions = TritonOptions(), version: int | str | None = None,
                      keep_versions: int = 2) -> Path:
    """Load ``model`` (an open_clip name, a checkpoint folder, an ``hqclip train`` checkpoint file or an
    ``hf-hub:`` id) and export it, with its tag head when it has one; the manifest path. ``version`` and
    ``keep_versions``: :func:`export_model`."""
    options = {"max_batch_size": max_batch_size, "opset": opset, "triton": triton, "version": version,
               "keep_versions": keep_versions}
    if Path(model).is_file():
        return _export_trained(Path(model), out, name, options)
    loaded = load_model(model, pretrained)
    return export_model(loaded.model, loaded.preprocess_cfg, loaded.tokenizer, out, name or default_name(model),
                        loaded.weights, architecture=loaded.architecture, **options)


def _export_trained(path: Path, out: Path, name: str | None, options: dict) -> Path:
    """An ``hqclip train`` checkpoint: the trained model, its short-tag head and the tag vocabulary."""
    import open_clip

    from training.checkpoint import load_trained

    bundle, head, vocab = load_trained(path)
    weights = f"hqclip train checkpoint {path.name} sha256:{sha256_file(path)[:16]}"
    return export_model(bundle.model, open_clip.get_model_preprocess_cfg(bundle.model),
                        tokenizer_info(bundle.tokenizer), out, name or default_name(path.stem), weights, head,
                        vocab.tags if vocab else None, architecture="hqclip train checkpoint", **options)
