"""Python client of the HQ-CLIP gateway: ``Client`` (blocking) and ``AsyncClient`` (asyncio), same methods."""

from hqclip_client.client import AsyncClient, Client
from hqclip_client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    HQClipError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from hqclip_client.transport import RetryPolicy
from hqclip_client.types import (
    AddResult,
    Classification,
    Collection,
    DeleteResult,
    Embeddings,
    ImageTags,
    Item,
    LabelScore,
    Refinement,
    SearchHit,
    SearchResult,
    TagScore,
)

__all__ = [
    "APIConnectionError", "APIStatusError", "APITimeoutError", "AddResult", "AsyncClient", "AuthenticationError",
    "BadRequestError", "Classification", "Client", "Collection", "ConflictError", "DeleteResult", "Embeddings",
    "HQClipError", "ImageTags", "InternalServerError", "Item", "LabelScore", "NotFoundError", "RateLimitError",
    "Refinement", "RetryPolicy", "SearchHit", "SearchResult", "ServiceUnavailableError", "TagScore",
]
__version__ = "0.1.0"
