"""Every config.pbtxt `hqclip export` writes parses with Triton's own protobuf schema and says what was asked.

The schema is ``tritonclient.grpc.model_config_pb2`` (Triton's model_config.proto), parsed with protobuf's
``text_format`` exactly as tritonserver reads the file: a misspelled or misplaced field fails the parse.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from hqclip.repo.manifest import load_manifest
from hqclip.repo.triton_config import PLAN_SCRIPT, Tensor, TritonOptions, triton_config
from testkit.tiny import TINY_EMBED_DIM

TAGS = ["cat", "dog", "astronaut", "coffee", "rocket", "snow", "night", "red"]
MAX_BATCH = 32
ONNX_TYPES = {"tensor(uint8)": model_config_pb2.TYPE_UINT8, "tensor(int64)": model_config_pb2.TYPE_INT64,
              "tensor(float)": model_config_pb2.TYPE_FP32}
OPTIONS = {
    "defaults": TritonOptions(),
    "cpu": TritonOptions(device="cpu", instances=2, preferred_batch_sizes=(8,), max_queue_delay_us=0),
    "accelerator-fp16": TritonOptions(device="gpu", tensorrt="accelerator"),
    "plan-fp16": TritonOptions(device="gpu", instances=2, preferred_batch_sizes=(4, 16), tensorrt="plan"),
}


def export_tagged(checkpoint: Path, repo: Path, triton: TritonOptions = TritonOptions()) -> Path:
    """The tiny checkpoint exported as model 'tiny' with a random short-tag head; the repository."""
    from training.export import export_model
    from training.models import load_model
    from training.tag_head import TagHead

    loaded = load_model(str(checkpoint))
    torch.manual_seed(0)
    export_model(loaded.model, loaded.preprocess_cfg, loaded.tokenizer, repo, "tiny", loaded.weights,
                 TagHead(TINY_EMBED_DIM, len(TAGS)), TAGS, max_batch_size=MAX_BATCH, triton=triton)
    return repo


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module", params=list(OPTIONS), ids=list(OPTIONS))
def exported(request, tmp_path_factory, tiny_checkpoint) -> tuple[Path, TritonOptions]:
    options = OPTIONS[request.param]
    return export_tagged(tiny_checkpoint, tmp_path_factory.mktemp(request.param), options), options


@pytest.mark.slow  # four real exports
def test_configs_parse_and_match_the_onnx_graphs(exported):
    repo, options = exported
    manifest = load_manifest(repo, verify=True)
    towers = [manifest.image, manifest.text, manifest.tags]
    for tower in towers:
        folder = repo / tower.model
        config = parse(folder / "config.pbtxt")
        assert config.name == tower.model and config.max_batch_size == MAX_BATCH == manifest.max_batch_size
        session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
            assert [t.name for t in declared] == [t.name for t in actual] == [
                tower.input if declared is config.input else tower.output]
            assert declared[0].data_type == ONNX_TYPES[actual[0].type]
            # Triton adds the batch axis itself; a dynamic axis (the text's sequence) is -1
            assert list(declared[0].dims) == [d if isinstance(d, int) else -1 for d in actual[0].shape[1:]]

        batching = config.dynamic_batching
        assert list(batching.preferred_batch_size) == list(options.preferred_batch_sizes or (MAX_BATCH // 2, MAX_BATCH))
        assert batching.max_queue_delay_microseconds == options.max_queue_delay_us
        (group,) = config.instance_group
        kinds = {"auto": model_config_pb2.ModelInstanceGroup.KIND_AUTO,
                 "gpu": model_config_pb2.ModelInstanceGroup.KIND_GPU,
                 "cpu": model_config_pb2.ModelInstanceGroup.KIND_CPU}
        assert group.count == options.instances and group.kind == kinds[options.device]

        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        if options.tensorrt == "accelerator":
            (trt,) = accelerators
            assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
            assert trt.parameters["trt_engine_cache_path"].endswith("/" + tower.model)
        else:
            assert not accelerators
        if options.tensorrt == "plan":
            assert config.platform == "tensorrt_plan" and not config.backend
        else:
            assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
        assert (folder / PLAN_SCRIPT).exists() == (options.tensorrt == "plan")
        if options.tensorrt == "plan":
            largest = [manifest.text.tokenizer.context_length] if tower is manifest.text else list(config.input[0].dims)
            check_plan_script(folder, config, options, largest)


def check_plan_script(folder: Path, config: model_config_pb2.ModelConfig, options: TritonOptions,
                      largest: list[int]) -> None:
    """The trtexec command builds 1/model.plan from 1/model.onnx for exactly the shapes the config declares."""
    script = (folder / PLAN_SCRIPT).read_text()
    command = shlex.split(next(line for line in script.replace("\\\n", " ").splitlines()
                               if line.startswith("trtexec")))
    args = dict(arg.removeprefix("--").split("=", 1) for arg in command[1:] if "=" in arg)
    assert "--fp16" in command
    assert args["onnx"] == "model.onnx" and (folder / "1" / "model.onnx").is_file()
    assert "cd \"$(dirname \"$0\")/1\"" in script and "mv model.plan.partial model.plan" in script
    tensor = config.input[0]
    smallest = "x".join(str(max(d, 1)) for d in tensor.dims)  # a dynamic axis (-1) from 1 up to its largest
    dims = "x".join(str(d) for d in largest)
    assert args["minShapes"] == f"{tensor.name}:1x{smallest}"
    assert args["optShapes"] == f"{tensor.name}:{max(options.preferred_batch_sizes)}x{dims}"
    assert args["maxShapes"] == f"{tensor.name}:{config.max_batch_size}x{dims}"


def test_a_misspelled_field_fails_the_parse():
    text = triton_config("m", [Tensor("pixel_values", np.uint8, (3, 8, 8))], [Tensor("embeddings", np.float32, (4,))],
                         MAX_BATCH)
    text_format.Parse(text, model_config_pb2.ModelConfig())
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text.replace("max_queue_delay_microseconds", "max_queue_delay_us"),
                          model_config_pb2.ModelConfig())


def test_bad_options_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="none, accelerator, plan"):
        TritonOptions(tensorrt="plans")
    with pytest.raises(ValueError, match="GPUs"):
        TritonOptions(device="cpu", tensorrt="accelerator")
    with pytest.raises(ValueError, match="exceed"):
        TritonOptions(preferred_batch_sizes=(64,)).preferred(MAX_BATCH)
    assert np.array_equal(TritonOptions().preferred(1), [1])
