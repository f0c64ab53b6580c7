"""A Triton Python-backend model that runs its version folder's ``model.onnx`` with ONNX Runtime.

pytriton's tritonserver has the Python backend only; tests/servers/triton_mirror.py puts this file into every version
folder of the Triton repository it mirrors, so Triton itself loads, versions and unloads the exported models
(``--model-control-mode=explicit``), as it would with its ONNX Runtime backend on a GPU host.
"""

import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.input, self.output = config["input"][0]["name"], config["output"][0]["name"]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            inputs = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            outputs = self.session.run([self.output], {self.input: inputs})[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, outputs)]))
        return responses
