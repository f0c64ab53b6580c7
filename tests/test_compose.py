"""docker/docker-compose.yml against the Compose Specification's JSON schema, and the deployment it describes.

There is no Docker engine here, so the file is checked the way `docker compose config` would start: variables
interpolated (from docker/.env.example), then validated against the Compose Specification schema as vendored by
the maintained `check-jsonschema` package (its ``vendor/compose-spec.json``, taken from compose-spec/compose-spec).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.resources
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from hqclip.repo.triton_config import PLAN_SCRIPT
from services.settings import Settings

DOCKER = Path(__file__).resolve().parents[1] / "docker"
GPU_SERVICES = {"triton", "vllm", "trt-build", "gateway-gpu"}  # gateway: the slim CPU image; gateway-gpu: FAISS GPU
LONG_RUNNING = {"triton", "vllm", "gateway", "gateway-gpu", "etcd", "minio", "milvus"}  # trt-build: a one-shot job
MILVUS_PROFILE = {"etcd", "minio", "milvus"}
VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}``: the value when set and non-empty, else the default."""
    return VARIABLE.sub(lambda m: env.get(m[1]) or (m[2] or ""), text)


def compose_schema() -> dict:
    schema = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(schema.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolate((DOCKER / "docker-compose.yml").read_text(), env_example()))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Validator:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_compose_file_follows_the_compose_specification(compose, validator):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    source = f"compose-spec.json from check-jsonschema {importlib.metadata.version('check-jsonschema')}"
    assert not errors, f"against {source}:\n" + "\n".join(errors)


def test_the_schema_catches_a_misspelled_key(compose, validator):
    broken = copy.deepcopy(compose)
    broken["services"]["triton"]["healthcheck"]["intervall"] = "10s"
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(compose)
    broken["services"]["gateway"]["depends_on"]["triton"]["condition"] = "service_ready"
    assert not validator.is_valid(broken)


def test_every_service_has_image_volumes_and_its_healthcheck_and_gpus(compose):
    services = compose["services"]
    assert set(services) == GPU_SERVICES | LONG_RUNNING
    for name, service in services.items():
        assert service.get("image"), f"{name}: no image"
        assert service.get("volumes"), f"{name}: no volumes"
        if name in LONG_RUNNING:
            test = service["healthcheck"]["test"]
            assert test[0] == "CMD" and "disable" not in service["healthcheck"], f"{name}: no healthcheck"
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d["capabilities"]]
        assert bool(gpus) == (name in GPU_SERVICES), f"{name}: GPU reservation {devices}"


def test_triton_vllm_and_gateway_are_wired_together(compose):
    triton, vllm, gateway = (compose["services"][name] for name in ("triton", "vllm", "gateway"))
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert any(v.endswith(":/models:ro") for v in triton["volumes"])
    assert "--model-repository=/models" in triton["command"]

    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert "--model=zhixiangwei/qwen2-7b-full" in vllm["command"]  # the released recaptioner by default

    assert gateway["depends_on"] == {"triton": {"condition": "service_healthy"},
                                     "vllm": {"condition": "service_healthy"},
                                     "milvus": {"condition": "service_healthy", "required": False}}
    env = gateway["environment"]
    assert env["HQCLIP_BACKEND"] == "triton" and env["HQCLIP_TRITON__URL"] == "dns:///triton:8001"
    assert env["HQCLIP_REFINE__URLS"] == "http://vllm:8000/v1"

    build = compose["services"]["trt-build"]
    assert build["profiles"] == ["tensorrt"]
    assert f"/models/*/{PLAN_SCRIPT}" in build["command"][-1]  # the scripts `hqclip export --tensorrt plan` writes
    assert build["image"].split(":")[1] == triton["image"].split(":")[1]  # plans load only in the same TensorRT
    assert triton["depends_on"]["trt-build"] == {"condition": "service_completed_successfully", "required": False}


def test_gpu_gateway_is_the_gateway_on_the_cuda_image_with_a_gpu_under_its_profile(compose):
    gateway, gpu = compose["services"]["gateway"], compose["services"]["gateway-gpu"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in gateway  # plain `up` starts the CPU gateway only
    assert gpu["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.gateway-gpu"}
    assert gpu["image"].startswith("hqclip/gateway-gpu:")
    assert gpu["environment"] == {**gateway["environment"], "HQCLIP_INDEX__GPU": "true"}
    same = ("volumes", "ports", "healthcheck", "depends_on", "restart")
    assert {key: gpu[key] for key in same} == {key: gateway[key] for key in same}
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "--profile gpu up -d --scale gateway=0" in (DOCKER / "docker-compose.yml").read_text()


@pytest.mark.parametrize("service", ["gateway", "gateway-gpu"])
def test_gateway_environment_names_real_settings(compose, service):
    """Each HQCLIP_* variable the compose file sets is a field of services.settings.Settings (no silent typos)."""
    for name in compose["services"][service]["environment"]:
        path = name.removeprefix("HQCLIP_").lower().split("__")
        model = Settings
        for part in path:
            assert part in model.model_fields, f"{name}: Settings has no '{part}'"
            model = model.model_fields[part].annotation


def test_env_example_documents_exactly_the_variables_compose_uses():
    used = {m[1] for m in VARIABLE.finditer((DOCKER / "docker-compose.yml").read_text())}
    assert used == set(env_example())


def test_milvus_profile_is_a_standalone_server_with_its_dependencies(compose):
    services = compose["services"]
    assert {name for name, service in services.items() if service.get("profiles") == ["milvus"]} == MILVUS_PROFILE
    milvus = services["milvus"]
    assert milvus["image"].startswith("milvusdb/milvus:") and milvus["command"] == ["milvus", "run", "standalone"]
    assert milvus["environment"]["ETCD_ENDPOINTS"] == "etcd:2379"
    assert milvus["environment"]["MINIO_ADDRESS"] == "minio:9000"
    assert milvus["depends_on"] == {"etcd": {"condition": "service_healthy"},
                                    "minio": {"condition": "service_healthy"}}
    assert "/healthz" in " ".join(milvus["healthcheck"]["test"])
    named = set(compose["volumes"])
    for name in MILVUS_PROFILE:  # each keeps its state in a named volume
        assert any(v.split(":")[0] in named for v in services[name]["volumes"]), name
    env = services["gateway"]["environment"]
    assert env["HQCLIP_INDEX__BACKEND"] == "faiss" and env["HQCLIP_INDEX__MILVUS_URI"] == "http://milvus:19530"
