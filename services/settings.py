"""All gateway settings, in one pydantic-settings class.

Every knob is read from the environment with the prefix ``HQCLIP_``; nested sections use ``__``
(``HQCLIP_BATCH__TEXT_MAX_SIZE=64``). A few common knobs are flat (``HQCLIP_PORT``, ``HQCLIP_API_KEYS``).
Settings are built once, in ``services.app.create_app`` or the CLI, never at import time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The old names of the text batch settings: still read (HQCLIP_BATCH__MAX_SIZE, HQCLIP_BATCH__WORKERS), with a warning.
_RENAMED_BATCH = {"max_size": "text_max_size", "workers": "text_workers"}


class BatchSettings(BaseModel):
    """The micro-batcher (services/engine.py): one per tower, texts and images set alike."""

    text_max_size: int = Field(32, ge=1, description="Most texts one backend call takes.")
    image_max_size: int = Field(
        8, ge=1, description="Most images one backend call takes: image towers on CPU run fastest per image in "
        "small batches (README, Settings).",
    )
    max_delay_ms: float = Field(
        0.0, ge=0, description="How long the first item waits for others to join. 0: a batch is what is waiting when "
        "a backend call can start; batches grow by themselves while the backend is busy (benchmarks/RESULTS.md).",
    )
    queue_size: int = Field(512, ge=1, description="Items waiting per model before requests get 429.")
    text_workers: int = Field(1, ge=1, description="Backend calls running at once for texts.")
    image_workers: int = Field(
        2, ge=1, description="Backend calls running at once for images: one batch runs while the next is decoded.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: object) -> object:
        if isinstance(values, dict):
            for old, new in _RENAMED_BATCH.items():
                if old in values:
                    logging.getLogger("hqclip.settings").warning(
                        "HQCLIP_BATCH__%s is deprecated: use HQCLIP_BATCH__%s", old.upper(), new.upper())
                    values = {new: values[old], **{k: v for k, v in values.items() if k != old}}
        return values


class LimitSettings(BaseModel):
    """What one request may ask for; past these the request gets a 4xx naming the field."""

    max_items: int = Field(256, ge=1, description="Inputs in one request.")
    max_image_bytes: int = Field(20 * 1024 * 1024, description="Bytes of one encoded image.")
    max_image_pixels: int = Field(40_000_000, description="Pixels of one decoded image (decompression bombs).")
    max_text_chars: int = Field(20_000, description="Characters of one text, before tokenization.")
    max_labels: int = Field(1000, description="Labels in one classification request.")


class TritonSettings(BaseModel):
    """The Triton backend (services/backends/triton.py)."""

    url: str = Field(
        "127.0.0.1:8001", description="Triton's gRPC address; dns:///host:8001 balances over every address of host."
    )
    timeout_s: float = Field(30.0, gt=0, description="Per-inference timeout; past it the request gets 503.")
    ready_timeout_s: float = Field(2.0, gt=0, description="Timeout of each readiness check (/ready during an outage).")


class IndexParams(BaseModel):
    """How a new collection's index is built (FAISS: services/index/vectors.py, Milvus: services/index/milvus.py);
    a create request may override each."""

    kind: Literal["flat", "hnsw", "ivfpq"] = Field(
        "flat", description="flat: exact; hnsw: graph; ivfpq: compressed, exact re-ranking (docs/retrieval.md)."
    )
    hnsw_m: int = Field(32, ge=4, le=128, description="hnsw: graph neighbours per node.")
    ef_construction: int = Field(80, ge=8, description="hnsw: candidate list while inserting.")
    ef_search: int = Field(128, ge=8, description="hnsw: candidate list while searching (at least top_k).")
    nlist: int = Field(1024, ge=1, description="ivfpq: inverted lists; trained once 40 x max(nlist, 256) items.")
    pq_m: int = Field(64, ge=1, description="ivfpq: PQ sub-quantizers (lowered to a divisor of the dimension).")
    nprobe: int = Field(32, ge=1, description="ivfpq: lists visited per query.")
    rerank: int = Field(50, ge=1, description="ivfpq: candidates per wanted result, re-ranked exactly.")


class IndexSettings(IndexParams):
    """Retrieval collections (services/index/): which engine stores them, where, how often FAISS snapshots them,
    index defaults."""

    backend: Literal["faiss", "milvus"] = Field(
        "faiss", description="faiss: FAISS + SQLite in the gateway, under dir (the default); milvus: a Milvus server "
        "or milvus-lite at milvus_uri (docs/retrieval.md, when to switch).",
    )
    milvus_uri: str = Field(
        "data/collections/milvus.db", description="milvus: http://host:19530 (a server or cluster), or a local "
        "file path ending in .db (milvus-lite, embedded).",
    )
    milvus_consistency: Literal["Strong", "Session", "Bounded", "Eventually"] = Field(
        "Strong", description="milvus: the consistency level of every search and read. Strong: every write "
        "acknowledged by any gateway is seen (~200 ms a search: Milvus's time tick); Session: this gateway's own "
        "writes are seen; Bounded: seconds-stale reads in a few ms (docs/retrieval.md, Milvus).",
    )
    dir: Path = Field(Path("data/collections"), description="Folder of collections, one subfolder each.")
    snapshot_interval_s: float = Field(30.0, gt=0, description="How often changed collections are snapshotted.")
    gpu: bool = Field(True, description="Run indexes on a GPU when FAISS sees one (a faiss-gpu build).")
    auto_tag_threshold: float = Field(
        0.5, ge=0, le=1, description="Images stored without an LVLM get the model's own tags (its short-tag head) "
        "at or above this probability (services/tagging.py).",
    )
    auto_tag_top_k: int = Field(5, ge=0, description="Most model tags per stored image; 0: none.")


class RefineSettings(BaseModel):
    """The LVLM that writes refinements (services/refine/): any OpenAI-compatible chat server, vLLM in production."""

    urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Server base URLs (http://HOST:8000/v1), comma-separated; round-robin with failover. "
        "Empty: /v1/refine answers 503.",
    )
    model: str | None = Field(None, description="The model the servers serve; default: the first one they list.")
    prompt: str | None = Field(
        None, description="Instruction replacing the default (docs/refinement.md); '{alt_text}' marks the alt text."
    )
    api_key: str | None = Field(None, description="Bearer key of the servers (vllm serve --api-key).")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    retries: int = Field(2, ge=0, description="Retries after a 5xx, a timeout or an unusable answer, with backoff.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once, over all servers.")
    max_tokens: int = Field(1024, ge=16, description="Most tokens one answer may take.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 = greedy.")
    seed: int | None = Field(None, description="Sampling seed (the n-th retry uses seed + n): with a temperature, "
                             "the same image and prompt give the same answer.")

    @field_validator("urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [u.strip() for u in value.split(",") if u.strip()]
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HQCLIP_", env_nested_delimiter="__", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gateway binds.")
    port: int = Field(8000, description="Port the gateway binds.")
    model_repo: Path = Field(Path("model_repo"), description="The Triton model repository `hqclip export` wrote.")
    model: str | None = Field(None, description="Which model of the repository to serve; default: the only one.")
    backend: Literal["auto", "onnxruntime", "openvino", "triton"] = Field(
        "auto", description="Where inference runs. auto (the default): in process, on the runtime that is fastest "
        "for each tower on this CPU (measured at start when both ONNX Runtime and OpenVINO can run it); "
        "onnxruntime or openvino: in process on that runtime; triton: on a Triton server. A bf16 variant always "
        "runs on OpenVINO. The start-up log and /v1/models say what was chosen and why (docs/precision.md).",
    )
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto", description="Which exported precision to serve. auto (the default): the fastest variant in the "
        "repository (each passed its parity gates at export) that this CPU computes natively: bf16 only with "
        "AVX512-BF16 or AMX, int8 only with VNNI or AMX-INT8, else fp32. An explicit precision the CPU only emulates "
        "is refused at start (see allow_emulated).",
    )
    allow_emulated: bool = Field(
        False, description="Serve an explicit HQCLIP_PRECISION this CPU only emulates (bf16 without AVX512-BF16 or "
        "AMX ran 40x slower than fp32 on a ViT-B-16), with a warning, instead of refusing to start.",
    )
    ort_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = all cores.")
    ort_spinning: Literal["text", "all", "none"] = Field(
        "text", description="Which ONNX Runtime sessions' threads busy-wait for the next batch: spinning saves a "
        "text batch's wake-up, but on the image tower it takes the cores that decode the next images.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated bearer keys; empty = no auth."
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated bearer keys that may also call /v1/admin/* (a model "
        "reload); empty = nobody may. They pass wherever API keys do.",
    )
    reload_s: float = Field(
        0.0, ge=0, description="Seconds between looks at the served manifest file; when it changed (a new `hqclip "
        "export`), the new model is loaded beside the old one and swapped in. 0 = no watcher (POST /v1/admin/reload).",
    )
    reload_keep_previous: bool = Field(
        True, description="After a reload, keep the previous model loaded while a collection still holds its "
        "vectors, so text and image queries on it keep working until `hqclip reindex` has re-embedded it and its "
        "old copy is deleted (docs/reindex.md). Costs a second model's memory meanwhile; false: such queries get 409.",
    )
    log_level: str = Field("info", description="uvicorn log level.")
    batch: BatchSettings = BatchSettings()
    limits: LimitSettings = LimitSettings()
    triton: TritonSettings = TritonSettings()
    index: IndexSettings = IndexSettings()
    refine: RefineSettings = RefineSettings()

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value
