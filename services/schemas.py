"""Request and response models of the gateway's core endpoints, all in one place."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

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
