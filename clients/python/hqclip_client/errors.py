"""Exceptions: every error the gateway answers becomes an ``APIStatusError`` carrying its message, param and status."""

from __future__ import annotations

from typing import Any

import httpx


class HQClipError(Exception):
    """Base of every exception this package raises."""


class APIConnectionError(HQClipError):
    """The gateway could not be reached (refused, reset, DNS); check the URL and that `hqclip serve` runs."""


class APITimeoutError(APIConnectionError):
    """No answer within the timeout; raise ``timeout=`` for large batches or a slow backend."""


class APIStatusError(HQClipError):
    """The gateway answered with an error: ``status``, its ``message``, the request field at fault (``param``)."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 code: Any = None, headers: httpx.Headers | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or httpx.Headers()

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.status} {self.type or 'error'}: {self.message}{where}"


class BadRequestError(APIStatusError):
    """400, 413, 422: the request is wrong; ``param`` names the field."""


class AuthenticationError(APIStatusError):
    """401: give the right key (``api_key=`` or HQCLIP_API_KEY)."""


class NotFoundError(APIStatusError):
    """404: unknown model, collection or item."""


class ConflictError(APIStatusError):
    """409: e.g. a collection that already exists."""


class RateLimitError(APIStatusError):
    """429 after every retry: the gateway's queue stayed full."""


class ServiceUnavailableError(APIStatusError):
    """503 after every retry: the backend (Triton, vLLM) is down or not configured."""


class InternalServerError(APIStatusError):
    """Any other 5xx."""


_BY_STATUS = {401: AuthenticationError, 404: NotFoundError, 409: ConflictError, 429: RateLimitError,
              503: ServiceUnavailableError}


def status_error(response: httpx.Response) -> APIStatusError:
    """The exception for an error response, from the gateway's OpenAI-shaped body (or its text if not JSON)."""
    status = response.status_code
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        text = response.text.strip()[:500] or response.reason_phrase
        error = {"message": f"{text} ({response.request.method} {response.request.url.path})"}
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else BadRequestError)
    return cls(status, str(error.get("message")), error.get("param"), error.get("type"), error.get("code"),
               response.headers)
