"""Request and response models of the gateway's core endpoints, all in one place."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from services.index.collection import Filters, Hit, Item

EncodingFormat = Literal["float", "base64"]


# --- /v1/embeddings (OpenAI-compatible) ---
class EmbeddingsRequest(BaseModel):
    model: str = Field(description="The served model's name (see /v1/models).")
    input: str | list[str] = Field(description="Texts, or images as base64 / data URIs when modality is image.")
    encoding_format: EncodingFormat = "float"
    modality: Literal["text", "image"] = "text"
    dimensions: int | None = Field(None, description="Accepted for compatibility; must equal the model's dimension.")
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    truncated: bool = Field(False, description="The text was longer than the context and was cut, as open_clip does.")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


# --- /v1/embed (native, mixed text and image) ---
class EmbedInput(BaseModel):
    text: str | None = None
    image: str | None = Field(None, description="base64 or a data URI.")

    @model_validator(mode="after")
    def _one_of(self) -> EmbedInput:
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of 'text' or 'image'")
        return self


class EmbedRequest(BaseModel):
    inputs: list[EmbedInput]
    model: str | None = None
    encoding_format: EncodingFormat = "float"


class EmbedData(BaseModel):
    index: int
    modality: Literal["text", "image"]
    embedding: list[float] | str
    truncated: bool = False


class EmbedResponse(BaseModel):
    data: list[EmbedData]
    model: str
    usage: Usage


# --- /v1/classify ---
class ClassifyRequest(BaseModel):
    images: list[str] = Field(description="base64 or data URIs.")
    labels: list[str] = Field(description="Class names, e.g. ['cat', 'dog'].")
    templates: list[str] | None = Field(
        None, description="Prompt templates with one '{}' for the label; default: an ensemble of seven."
    )
    top_k: int = Field(5, ge=1)
    model: str | None = None


class LabelScore(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    index: int
    labels: list[LabelScore]


class ClassifyResponse(BaseModel):
    data: list[Classification]
    model: str


# --- /v1/tags ---
class TagsRequest(BaseModel):
    images: list[str] = Field(description="base64 or data URIs.")
    top_k: int = Field(10, ge=1)
    threshold: float = Field(0.0, ge=0.0, le=1.0, description="Leave out tags below this probability.")
    model: str | None = None


class TagScore(BaseModel):
    tag: str
    probability: float


class ImageTags(BaseModel):
    index: int
    tags: list[TagScore]


class TagsResponse(BaseModel):
    data: list[ImageTags]
    model: str


# --- /v1/refine ---
class RefineInput(BaseModel):
    image: str = Field(description="base64 or a data URI (JPEG, PNG, WebP, GIF or BMP).")
    alt_text: str | None = Field(None, description="The image's alt text: a reference for the LVLM, may be noisy.")


class RefineRequest(BaseModel):
    input: RefineInput | list[RefineInput] = Field(description="One image, or a batch.")


class RefinementData(BaseModel):
    object: Literal["refinement"] = "refinement"
    index: int
    desc: list[str] = Field(description="Clauses describing the image.")
    neg_desc: list[str] = Field(description="The same clauses made subtly wrong (hard negatives).")
    tags: list[str] = Field(description="Short tags.")
    neg_tags: list[str] = Field(description="For each tag, a similar tag that does not fit (aligned with tags).")
    latency_ms: float


class RefineResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[RefinementData]
    model: str = Field(description="The LVLM that wrote the refinements.")
    latency_ms: float = Field(description="Time the whole request took in the gateway.")


# === /v1/collections (services/routes/collections.py; the store keeps plain dataclasses: services/index/collection.py)
MAX_TOP_K = 1000
MAX_OFFSET = 10_000

AttributeValue = str | int | float | bool | None


class CreateCollectionRequest(BaseModel):
    name: str = Field(description="1-64 letters, digits, '_', '.' or '-'.")
    dim: int | None = Field(None, gt=0, description="Vector dimension; default: the served model's.")
    index: dict[str, Any] = Field(
        default_factory=dict,
        description="Index parameters overriding the HQCLIP_INDEX__* defaults: kind (flat, hnsw, ivfpq), hnsw_m, "
        "ef_construction, ef_search, nlist, pq_m, nprobe, rerank.",
    )
    keep_images: bool = Field(False, description="Image items keep their bytes, so `hqclip reindex` can embed them "
                              "again without their uri (FAISS only; costs the images' size on disk).")


class ItemMetadata(BaseModel):
    """An item's metadata."""

    id: str = Field(min_length=1, max_length=512)
    uri: str | None = None
    caption: str | None = None
    tags: list[str] = Field(default_factory=list)
    attributes: dict[str, Any] = Field(default_factory=dict)

    def to_item(self) -> Item:
        return Item(self.id, self.uri, self.caption, list(self.tags), dict(self.attributes))


class ItemIn(ItemMetadata):
    """An item and what to embed: exactly one of text, image (base64 / data URI) or a precomputed vector."""

    text: str | None = None
    image: str | None = None
    vector: list[float] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ItemIn:
        if sum(v is not None for v in (self.text, self.image, self.vector)) != 1:
            raise ValueError("give exactly one of 'text', 'image' or 'vector'")
        return self


class AddItemsRequest(BaseModel):
    items: list[ItemIn]
    refine: bool | None = Field(
        None, description="Store the LVLM's tags and descriptions of each image: default when a refiner is "
        "configured (HQCLIP_REFINE__URLS); true requires one; false skips it."
    )


class DeleteItemsRequest(BaseModel):
    ids: list[str] = Field(min_length=1)


class SearchFilters(BaseModel):
    """Which items a search may return: all of ``tags`` present, every attribute equal (JSON types compared)."""

    tags: list[str] = Field(default_factory=list, description="The item's tags contain every one of these.")
    attributes: dict[str, AttributeValue] = Field(default_factory=dict, description="attributes[key] == value, typed.")

    @field_validator("attributes")
    @classmethod
    def _keys(cls, value: dict[str, AttributeValue]) -> dict[str, AttributeValue]:
        for key in value:
            if not key or '"' in key or "\\" in key:
                raise ValueError(f"attribute name {key!r} must be non-empty and free of quotes and backslashes")
        return value

    def to_filters(self) -> Filters:
        return Filters(list(self.tags), dict(self.attributes))


class SearchRequest(BaseModel):
    """Exactly one query: text, image (base64 / data URI), vector, or the id of a stored item."""

    text: str | None = None
    image: str | None = None
    vector: list[float] | None = None
    id: str | None = Field(None, description="Find items like this stored one (it is left out of the results).")
    templates: bool | list[str] = Field(
        False, description="text only: embed through prompt templates ('{}' = the text) and average; true = the "
        "gateway's default ensemble (the one /v1/classify uses)."
    )
    top_k: int = Field(10, ge=1, le=MAX_TOP_K)
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="Skip this many results (paging).")
    filters: SearchFilters | None = None

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if sum(v is not None for v in (self.text, self.image, self.vector, self.id)) != 1:
            raise ValueError("give exactly one of 'text', 'image', 'vector' or 'id'")
        if self.templates and self.text is None:
            raise ValueError("'templates' applies to a 'text' query only")
        if isinstance(self.templates, list) and not all("{}" in t for t in self.templates):
            raise ValueError("each template needs one '{}' where the text goes")
        return self


class SearchResponse(BaseModel):
    collection: str
    results: list[Hit] = Field(description="Best first: id, score (cosine), uri, caption, tags, attributes, created.")
    top_k: int
    offset: int


class CollectionInfo(BaseModel):
    name: str
    backend: Literal["faiss", "milvus"]
    kind: str
    dim: int
    count: int
    model: str | None = Field(description="The model that embedded it (None: vectors of another dimension).")
    fingerprint: str | None = Field(description="That model's fingerprint; queries embedded by another get 409.")
    created: float
    keep_images: bool = Field(False, description="Image items keep their bytes (for `hqclip reindex`).")
    spec: dict[str, Any] = Field(description="The index parameters besides kind and dim.")
    wal_pending: int = Field(0, description="faiss: WAL rows not yet covered by a snapshot.")
    gpu: bool = Field(False, description="faiss: searched on a GPU.")


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionInfo]
    aliases: dict[str, str] = Field(description="alias -> the collection it serves.")


class DeletedCollection(BaseModel):
    deleted: str


class AliasRequest(BaseModel):
    target: str = Field(description="The collection the alias serves from now on.")
    replace: bool = Field(False, description="When the alias's name is a collection: delete that collection and "
                          "let the alias take its name in the same step.")


class AliasResponse(BaseModel):
    alias: str
    target: str


class StoredItem(ItemMetadata):
    """An item as stored, with what it was embedded from (docs/reindex.md)."""

    source: Literal["text", "image", "vector"] | None = Field(
        description="What it was embedded from; null: stored before sources were kept.")
    text: str | None = Field(None, description="A text item's text.")
    image: str | None = Field(None, description="base64 of an image item's bytes (keep_images, with images=true).")
    updated: float | None = Field(None, description="Unix time of its last write.")


class ItemsPage(BaseModel):
    collection: str = Field(description="The collection the name resolved to (an alias's target).")
    fingerprint: str | None
    now: float = Field(description="The gateway's clock when the page was read: `since` for a later catch-up.")
    items: list[StoredItem]
    next: str | None = Field(description="`after` for the next page; null on the last one.")


class UpsertResponse(BaseModel):
    collection: str
    upserted: int
    ids: list[str]
    count: int


class DeleteItemsResponse(BaseModel):
    collection: str
    deleted: list[str]
    not_found: list[str]
    count: int
