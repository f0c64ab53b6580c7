"""Every error the gateway names, and the one place that turns them into HTTP answers.

The engine, the batcher and the backends raise domain errors in their own words (a queue is full, an input is bad,
the model has no tag head, the backend is down): they know nothing of HTTP or of request fields. A route says which
request field an engine call's inputs came from (``inputs_from``); the handlers below choose the status code and
name the field. Every answer has OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.backends.base import BackendUnavailable


# --- the domain's errors (no HTTP here) ---
@dataclass(frozen=True)
class Source:
    """Where an engine call's inputs came from: a request field, and how its i-th input is named."""

    field: str
    each: str = "{field}[{i}]"
    at: Sequence[int] | None = None  # the request position of each input of the call; None: its place in the call

    def name(self, index: int | None) -> str:
        if index is None:
            return self.field
        return self.each.format(field=self.field, i=index if self.at is None else self.at[index])


class InputError(Exception):
    """Something wrong with the inputs of one engine call: ``index`` is the input's place in the call, or None
    for the call as a whole. The route that made the call attaches its ``source``."""

    def __init__(self, reason: str, index: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.index = reason, index
        self.source: Source | None = None

    @property
    def param(self) -> str | None:
        return self.source.name(self.index) if self.source else None

    @property
    def message(self) -> str:
        where = self.param or (f"input {self.index}" if self.index is not None else "the request")
        return f"{where}: {self.reason}"


class BadInput(InputError):
    """An input the model cannot take: an image that does not decode, a text over the length limit."""


class TooManyInputs(InputError):
    """More inputs in one call than the queue could ever hold: the request must be split, never retried as is."""


class QueueFull(Exception):
    """The batcher's backlog is at its bound: retry after a moment."""


class NoTagHead(Exception):
    """The served model was exported without a short-tag head."""


class LoadFailed(Exception):
    """A new export could not be loaded (a missing or corrupt file, a bad manifest); the old model serves on."""


class ApiError(Exception):
    """An error a route finds in the request itself; ``param`` names the request field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type, headers


@contextmanager
def inputs_from(field: str, each: str = "{field}[{i}]", at: Sequence[int] | None = None) -> Iterator[None]:
    """Name the request field behind the engine calls inside: ``with inputs_from("items", "items[{i}].text", at):``."""
    try:
        yield
    except InputError as exc:
        exc.source = Source(field, each, at)
        raise


# --- the HTTP edge ---
def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _answer(status: int, message: str, type: str, param: str | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, status), status_code=status, headers=headers)


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _answer(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(BadInput)
    async def _bad_input(_: Request, exc: BadInput) -> JSONResponse:
        return _answer(400, exc.message, "invalid_request_error", exc.param)

    @app.exception_handler(TooManyInputs)
    async def _too_many(_: Request, exc: TooManyInputs) -> JSONResponse:
        return _answer(413, exc.message, "invalid_request_error", exc.param)

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return _answer(429, f"{exc}; retry after a moment", "rate_limit_error", headers={"Retry-After": "1"})

    @app.exception_handler(NoTagHead)
    async def _no_tag_head(_: Request, exc: NoTagHead) -> JSONResponse:
        return _answer(404, str(exc), "not_found_error", "model")

    @app.exception_handler(LoadFailed)
    async def _load_failed(_: Request, exc: LoadFailed) -> JSONResponse:
        return _answer(422, str(exc), "model_load_error")

    @app.exception_handler(BackendUnavailable)
    async def _unavailable(_: Request, exc: BackendUnavailable) -> JSONResponse:
        message = f"inference backend unavailable: {exc}; retry shortly, and check /ready"
        return _answer(503, message, "service_unavailable", headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = _location(tuple(first.get("loc", ())))
        return _answer(422, f"{param}: {first.get('msg', 'invalid value')}", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _answer(exc.status_code, str(exc.detail), kind, None, exc.headers)
