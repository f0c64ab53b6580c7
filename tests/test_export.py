"""`hqclip export`: ONNX towers that match open_clip's torch forward on real photos and texts, through the
services' own preprocessing and tokenizer; config.pbtxt Triton accepts; a manifest that verifies; atomic writes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import pytest
import torch
from google.protobuf import text_format
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from skimage import data as skdata
from tritonclient.grpc import model_config_pb2

from hqclip.repo.layout import onnx_path
from hqclip.repo.manifest import load_manifest, sha256_file
from hqclip.repo.preprocess import ImagePreprocessor
from hqclip.repo.tokenizer import load_tokenizer, trim_padding
from testkit.tiny import write_tiny_checkpoint
from testkit.vectors import cosines
from training.export import export_checkpoint, export_model
from training.models import load_model

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"max_bytes": 20 * 1024 * 1024, "max_pixels": 40_000_000}
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "colorwheel", "hubble_deep_field"]
CAPTIONS = [
    "a photo of an astronaut in a white space suit",
    "a cup of coffee on a wooden table",
    "a cat lying on a carpet",
    "a rocket on the launch pad, ready for lift-off",
    "Tom &amp; Jerry",
    "東京の夜景",
    "🙂 a smiling face",
    "",
    "a very long description of a busy street market with many people, stalls, fruits, vegetables, " * 5,
]
TAGS = ["astronaut", "coffee", "cat", "rocket", "space"]


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def photo_batch(size: int) -> list[bytes]:
    """``size`` distinct real photos: scikit-image's, then their mirror images and rotations."""
    images = [Image.fromarray(getattr(skdata, name)()) for name in PHOTOS]
    variants = [lambda im: im, lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                lambda im: im.transpose(Image.Transpose.ROTATE_90), lambda im: im.transpose(Image.Transpose.ROTATE_270)]
    return [jpeg(variants[i // len(images)](images[i % len(images)])) for i in range(size)]


def caption_batch(size: int) -> list[str]:
    return [f"{CAPTIONS[i % len(CAPTIONS)]} (number {i})" if i >= len(CAPTIONS) else CAPTIONS[i] for i in range(size)]


@dataclass
class Exported:
    repo: Path
    checkpoint: Path
    model: torch.nn.Module
    tag_head: torch.nn.Module
    preprocess_cfg: dict

    def session(self, model: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(onnx_path(self.repo, model)), providers=["CPUExecutionProvider"])

    def onnx_images(self, images: list[bytes]) -> np.ndarray:
        manifest = load_manifest(self.repo)
        preprocess = ImagePreprocessor(manifest.image, **LIMITS)
        pixels = np.stack([preprocess(data) for data in images])
        return self.session(manifest.image.model).run(None, {"pixel_values": pixels})[0]

    def torch_images(self, images: list[bytes]) -> np.ndarray:
        """open_clip's own path: its transform on the PIL image, its forward."""
        preprocess = image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)
        batch = torch.stack([preprocess(Image.open(io.BytesIO(data))) for data in images])
        with torch.no_grad():
            return self.model.encode_image(batch, normalize=True).numpy()

    def onnx_texts(self, texts: list[str], cut: int | None = None) -> np.ndarray:
        """Through the services' tokenizer; the ids cut to their first ``cut`` columns when given."""
        manifest = load_manifest(self.repo)
        ids, _ = load_tokenizer(manifest.text.tokenizer, self.repo)(texts)
        return self.session(manifest.text.model).run(None, {"input_ids": ids[:, :cut]})[0]

    def torch_texts(self, texts: list[str]) -> np.ndarray:
        tokenizer = open_clip.get_tokenizer(f"local-dir:{self.checkpoint}")
        with torch.no_grad():
            return self.model.encode_text(tokenizer(texts), normalize=True).numpy()


@pytest.fixture(scope="module", params=[pytest.param(("clip", "vit"), id="vit+clip-text"),
                                        pytest.param(("hf", "timm"), id="timm+hf-text", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory) -> Exported:
    text_tower, image_tower = request.param
    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint"), text_tower, image_tower)
    loaded = load_model(str(checkpoint))
    torch.manual_seed(0)
    tag_head = torch.nn.Linear(64, len(TAGS))
    repo = tmp_path_factory.mktemp("repo") / "model_repo"
    export_model(loaded.model, loaded.preprocess_cfg, loaded.tokenizer, repo, "tiny", loaded.weights,
                 tag_head=tag_head, tag_vocab=TAGS, architecture=loaded.architecture)
    return Exported(repo, checkpoint, loaded.model, tag_head, loaded.preprocess_cfg)


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_image_tower_matches_open_clip_on_real_photos(exported, batch):
    images = photo_batch(batch)
    got, want = exported.onnx_images(images), exported.torch_images(images)
    assert got.shape == (batch, 64) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-5)
    assert cosines(got, want).min() >= 0.9999


def test_a_vit_runs_its_last_block_for_the_class_token_only(exported):
    """Same features as open_clip's ViT with fewer FLOPs (the export traces this path; the test above holds the
    ONNX embeddings to open_clip's own forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from training.onnx_towers import class_token_features, pools_class_token

    visual = exported.model.visual
    assert pools_class_token(visual) == (type(visual).__name__ == "VisionTransformer")
    if not pools_class_token(visual):
        return
    pixels = torch.randn(4, 3, 64, 64)
    flops = {}
    with torch.no_grad():
        for name, run in (("open_clip", visual), ("class token", lambda x: class_token_features(visual, x))):
            with FlopCounterMode(display=False) as counter:
                flops[name] = (run(pixels), counter.get_total_flops())
    torch.testing.assert_close(flops["class token"][0], flops["open_clip"][0], atol=1e-5, rtol=1e-5)
    blocks, tokens = len(visual.transformer.resblocks), visual._embeds(pixels).shape[1]
    saved = 1 - flops["class token"][1] / flops["open_clip"][1]
    # the last block's attention output and MLP for all tokens but one: most of a block, never all of it
    assert 0.25 / blocks < saved < 1 / blocks * (tokens - 1) / tokens, (saved, blocks, tokens)


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_text_tower_matches_open_clip(exported, batch):
    texts = caption_batch(batch)
    got, want = exported.onnx_texts(texts), exported.torch_texts(texts)
    assert got.shape == (batch, 64) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-5)
    assert cosines(got, want).min() >= 0.9999


def test_text_tower_takes_ids_cut_after_the_longest_text(exported):
    """What the services send: a batch of short texts cut after its longest (exactly, or rounded up to 8)."""
    manifest = load_manifest(exported.repo)
    assert manifest.text.any_length
    texts = [t for t in caption_batch(12) if len(t) < 60]
    ids, _ = load_tokenizer(manifest.text.tokenizer, exported.repo)(texts)
    longest = int(np.flatnonzero((ids != manifest.text.tokenizer.pad_id).any(axis=0))[-1]) + 1
    want = exported.torch_texts(texts)  # open_clip, at the full context length
    for cut in (longest, trim_padding(ids, manifest.text.tokenizer.pad_id).shape[1]):
        assert cut < manifest.text.tokenizer.context_length
        assert cosines(exported.onnx_texts(texts, cut), want).min() >= 0.9999


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_tag_head_gives_sigmoid_probabilities(exported, batch):
    embeddings = exported.onnx_images(photo_batch(batch))
    got = exported.session("tiny_tags").run(None, {"embeddings": embeddings})[0]
    with torch.no_grad():
        want = torch.sigmoid(exported.tag_head(torch.from_numpy(embeddings))).numpy()
    assert got.shape == (batch, len(TAGS))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_odd_images_embed_like_their_plain_rgb_equivalents(exported):
    coffee = Image.fromarray(skdata.coffee())
    gray8 = np.asarray(coffee.convert("L"))
    stored = coffee.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    png = {}
    for key, image in {"rgb": coffee, "rgba": coffee.convert("RGBA"), "gray": Image.fromarray(gray8),
                       "gray16": Image.fromarray(gray8.astype(np.uint16) * 257), "palette": coffee.convert("P"),
                       "palette_rgb": coffee.convert("P").convert("RGB")}.items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        png[key] = buffer.getvalue()
    cases = {  # odd input -> the plain RGB input it must embed like
        "rgba": (png["rgba"], png["rgb"], 0.9999),
        "16-bit": (png["gray16"], png["gray"], 0.9999),
        "palette": (png["palette"], png["palette_rgb"], 0.9999),
        "exif-rotated": (jpeg(stored, exif=exif.tobytes()), jpeg(coffee), 0.999),
        "cmyk": (jpeg(coffee.convert("CMYK")), jpeg(coffee), 0.999),
    }
    odd = exported.onnx_images([case[0] for case in cases.values()])
    plain = exported.onnx_images([case[1] for case in cases.values()])
    cosine = dict(zip(cases, cosines(odd, plain)))
    assert all(cosine[name] >= cases[name][2] for name in cases), cosine
    # the stored (sideways) pixels embed differently, so the EXIF check above can fail
    sideways = exported.onnx_images([jpeg(stored)])
    assert cosines(sideways, plain[3:4])[0] < cosine["exif-rotated"] - 1e-3
    tiny = exported.onnx_images([jpeg(Image.new("RGB", (1, 1), (200, 30, 40)))])
    assert np.isfinite(tiny).all() and abs(np.linalg.norm(tiny) - 1) < 1e-5


def test_manifest_describes_the_model_and_verifies(exported):
    manifest = load_manifest(exported.repo, "tiny", verify=True)
    cfg = exported.preprocess_cfg
    assert manifest.embed_dim == 64 and manifest.max_batch_size == 32 and manifest.weights == "random"
    assert manifest.logit_scale == pytest.approx(float(exported.model.logit_scale.detach().exp()))
    assert manifest.logit_bias is None
    assert manifest.image.size == (64, 64)
    assert manifest.image.mean == pytest.approx(tuple(cfg["mean"])) and manifest.image.std == pytest.approx(cfg["std"])
    assert (manifest.image.resize_mode, manifest.image.interpolation) == (cfg["resize_mode"], cfg["interpolation"])
    assert (manifest.image.model, manifest.text.model, manifest.tags.model) == ("tiny_image", "tiny_text", "tiny_tags")
    assert manifest.tags.vocabulary == TAGS and manifest.tags.output == "probabilities"
    assert (exported.repo / manifest.text.tokenizer.file).is_file()
    on_disk = {p.relative_to(exported.repo).as_posix() for p in exported.repo.rglob("*") if p.is_file()}
    assert set(manifest.files) == on_disk - {"tiny.manifest.json"}
    assert {"at", "torch", "open_clip_torch", "onnx", "opset"} <= set(manifest.created)


def test_manifest_checksums_catch_a_changed_file(exported, tmp_path):
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(exported.repo, copy)
    config = copy / "tiny_text" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 32", "max_batch_size: 64"))
    with pytest.raises(ValueError, match=r"tiny_text/config\.pbtxt"):
        load_manifest(copy, verify=True)


def test_triton_configs_parse_and_match_the_onnx_graphs(exported):
    expected = {"tiny_image": ("pixel_values", "TYPE_UINT8"), "tiny_text": ("input_ids", "TYPE_INT64"),
                "tiny_tags": ("embeddings", "TYPE_FP32")}
    for model, (input_name, input_type) in expected.items():
        config = text_format.Parse((exported.repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert (config.name, config.platform, config.backend) == (model, "onnxruntime_onnx", "onnxruntime")
        assert config.max_batch_size == 32 and config.HasField("dynamic_batching")
        graph = onnx.load(str(onnx_path(exported.repo, model))).graph
        for tensor, io_config in ((graph.input[0], config.input[0]), (graph.output[0], config.output[0])):
            dims = tensor.type.tensor_type.shape.dim
            assert dims[0].dim_param and not dims[0].dim_value  # a symbolic (dynamic) batch axis
            # Triton adds the batch axis itself; the text tower's sequence axis is dynamic too (-1)
            assert list(io_config.dims) == [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]
            assert io_config.name == tensor.name
        assert (config.input[0].name, model_config_pb2.DataType.Name(config.input[0].data_type)) == (input_name,
                                                                                                      input_type)
        assert model_config_pb2.DataType.Name(config.output[0].data_type) == "TYPE_FP32"


@pytest.mark.slow
def test_weights_in_a_checkpoint_folder_are_exported(tmp_path):
    """A released-style folder (open_clip_config.json + open_clip_model.safetensors): the ONNX towers carry the
    file's weights (not a fresh random init), and the manifest says where they came from."""
    from safetensors.torch import save_file

    checkpoint = write_tiny_checkpoint(tmp_path / "checkpoint")
    trained = load_model(str(checkpoint)).model
    with torch.no_grad():
        trained.logit_scale.fill_(np.log(50.0))
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, checkpoint / "open_clip_model.safetensors")

    manifest_path = export_checkpoint(str(checkpoint), out=tmp_path / "repo", name="released", max_batch_size=8)
    manifest = load_manifest(tmp_path / "repo", "released", verify=True)
    assert manifest_path.name == "released.manifest.json"
    assert manifest.weights.endswith("open_clip_model.safetensors") and manifest.max_batch_size == 8
    assert manifest.logit_scale == pytest.approx(50.0, rel=1e-5)
    exported = Exported(tmp_path / "repo", checkpoint, trained, None, load_model(str(checkpoint)).preprocess_cfg)
    images, texts = photo_batch(3), caption_batch(3)
    assert cosines(exported.onnx_images(images), exported.torch_images(images)).min() >= 0.9999
    assert cosines(exported.onnx_texts(texts), exported.torch_texts(texts)).min() >= 0.9999


def test_model_name_with_pretrained_file(tmp_path):
    """``hqclip export NAME --pretrained FILE``, with a .bin state dict (here a registered tiny config)."""
    checkpoint = write_tiny_checkpoint(tmp_path / "checkpoint")
    config = json.loads((checkpoint / "open_clip_config.json").read_text())
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-registered.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(tmp_path / "configs")
    trained = load_model("tiny-registered").model
    torch.save(trained.state_dict(), tmp_path / "weights.bin")

    export_checkpoint("tiny-registered", str(tmp_path / "weights.bin"), out=tmp_path / "repo", max_batch_size=4)
    manifest = load_manifest(tmp_path / "repo", "tiny-registered")
    assert manifest.architecture == "tiny-registered" and manifest.weights == str(tmp_path / "weights.bin")
    exported = Exported(tmp_path / "repo", checkpoint, trained, None, load_model("tiny-registered").preprocess_cfg)
    texts = caption_batch(4)
    assert cosines(exported.onnx_texts(texts), exported.torch_texts(texts)).min() >= 0.9999


def test_a_max_batch_of_one_still_exports_dynamic_axes(tmp_path):
    """torch.export fixes an axis it traces at size 1: the text tower must not learn batch 1 from the setting."""
    export_checkpoint(str(write_tiny_checkpoint(tmp_path / "checkpoint")), out=tmp_path / "repo", name="one",
                      max_batch_size=1)
    for tower in ("one_text", "one_image"):
        session = ort.InferenceSession(str(onnx_path(tmp_path / "repo", tower)))
        assert isinstance(session.get_inputs()[0].shape[0], str), (tower, session.get_inputs()[0].shape)


class Explodes(torch.nn.Module):
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


@pytest.mark.slow
def test_failed_export_changes_nothing_and_reexport_replaces(tmp_path):
    loaded = load_model(str(write_tiny_checkpoint(tmp_path / "checkpoint")))
    repo = tmp_path / "model_repo"
    export_model(loaded.model, loaded.preprocess_cfg, loaded.tokenizer, repo, "tiny", "random",
                 tag_head=torch.nn.Linear(64, len(TAGS)), tag_vocab=TAGS)
    before = {p.relative_to(repo).as_posix(): sha256_file(p) for p in repo.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="boom"):
        export_model(loaded.model, loaded.preprocess_cfg, loaded.tokenizer, repo, "tiny", "random",
                     tag_head=Explodes(), tag_vocab=TAGS)
    after = {p.relative_to(repo).as_posix(): sha256_file(p) for p in repo.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "model_repo"]  # no staging folder left

    export_model(loaded.model, loaded.preprocess_cfg, loaded.tokenizer, repo, "tiny", "random")
    manifest = load_manifest(repo, "tiny", verify=True)
    assert manifest.tags is None
    assert sorted(p.name for p in repo.iterdir()) == ["tiny.manifest.json", "tiny_image", "tiny_text"]


@pytest.mark.slow
def test_cli_export(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "my checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "hqclip.cli", "export", str(checkpoint), "--out", str(tmp_path / "repo"),
         "--max-batch-size", "8", "--opset", "18"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = load_manifest(tmp_path / "repo", verify=True)
    assert manifest.name == "my-checkpoint" and manifest.max_batch_size == 8 and manifest.created["opset"] == "18"
    assert onnx.load(str(tmp_path / "repo" / "my-checkpoint_image" / "1" / "model.onnx")).opset_import[0].version == 18
