"""Typed results (and the item model ``add`` takes). Unknown fields the gateway adds later are kept, not refused."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hqclip_client.vectors import Vectors


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True, protected_namespaces=())


class Embeddings(_Result):
    """Row i of ``vectors`` (L2-normalised) embeds input i."""

    vectors: Vectors
    truncated: list[bool] = Field(description="Texts cut to the model's context length, as open_clip cuts them.")
    model: str
    prompt_tokens: int = 0

    def __len__(self) -> int:
        return len(self.truncated)


class LabelScore(_Result):
    label: str
    score: float


class Classification(_Result):
    """The top labels of one image, best first; ``index`` is the image's position in the call."""

    index: int
    labels: list[LabelScore]

    @property
    def label(self) -> str:
        return self.labels[0].label

    @property
    def score(self) -> float:
        return self.labels[0].score


class TagScore(_Result):
    tag: str
    probability: float


class ImageTags(_Result):
    index: int
    tags: list[TagScore]


class Collection(_Result):
    name: str
    kind: str
    dim: int
    count: int
    model: str | None = None
    created: float | None = None
    spec: dict[str, Any] = Field(default_factory=dict)


class Item(_Result):
    """What ``add`` stores: an id, exactly one of text / image / vector to embed or store, and metadata."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    id: str
    text: str | None = None
    image: Any = Field(None, description="A path, encoded bytes, a PIL image or a uint8 array.")
    vector: Any = Field(None, description="A precomputed vector (list or array) of the collection's dimension.")
    uri: str | None = None
    caption: str | None = None
    tags: list[str] = Field(default_factory=list)
    attributes: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> Item:
        if sum(v is not None for v in (self.text, self.image, self.vector)) != 1:
            raise ValueError(f"item {self.id!r}: give exactly one of text, image or vector")
        return self


class AddResult(_Result):
    collection: str
    upserted: int
    ids: list[str]
    count: int = Field(description="Items in the collection after the last chunk.")


class DeleteResult(_Result):
    collection: str
    deleted: list[str]
    not_found: list[str]
    count: int


class SearchHit(_Result):
    id: str
    score: float
    uri: str | None = None
    caption: str | None = None
    tags: list[str] = Field(default_factory=list)
    attributes: dict[str, Any] = Field(default_factory=dict)
    created: float | None = None


class SearchResult(_Result):
    collection: str
    results: list[SearchHit]
    top_k: int
    offset: int


class Refinement(_Result):
    """The LVLM's four texts for one image (the VLM-150M fields); ``neg_tags[i]`` is the hard negative of
    ``tags[i]``."""

    index: int
    desc: list[str]
    neg_desc: list[str]
    tags: list[str]
    neg_tags: list[str]
    model: str
    latency_ms: float = 0.0
