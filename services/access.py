"""API keys and request metrics for every request, as plain ASGI middleware.

Plain ASGI rather than Starlette's ``@app.middleware("http")`` (BaseHTTPMiddleware), which runs each request in an
extra task with a streamed response: about a fifth of the gateway's CPU per search request went there.
"""

from __future__ import annotations

import hmac
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.errors import ApiError, error_body
from services.metrics import Metrics
from services.routes import page

OPEN_PATHS = frozenset({"/health", "/ready"})


def check_admin(request: Request, what: str, required: bool = True) -> None:
    """403 unless the request carries an admin key (``HQCLIP_ADMIN_KEYS``); with none configured, 403 when
    ``required``, else anyone may (``what`` names the action in the message)."""
    keys = request.app.state.settings.admin_keys
    if not keys:
        if required:
            raise ApiError(403, f"no admin keys are configured: set HQCLIP_ADMIN_KEYS to allow {what}",
                           param="authorization", type="permission_error")
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
    if not any([hmac.compare_digest(given, key.encode()) for key in keys]):  # noqa: C419 (no short cut: constant time)
        raise ApiError(403, f"{what} needs an admin key (HQCLIP_ADMIN_KEYS): send 'Authorization: Bearer <key>'",
                       param="authorization", type="permission_error")


class AccessMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str], metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.keys = [key.encode() for key in keys]

    def _allowed(self, scope: Scope) -> bool:
        path = scope["path"]
        if not self.keys or path in OPEN_PATHS or page.is_public(path):
            return True
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        given = given.decode("latin-1").removeprefix("Bearer ").strip().encode()
        # compare against every key, in constant time, so timing reveals neither key nor position
        return any([hmac.compare_digest(given, key) for key in self.keys])  # noqa: C419 (a list: no short cut)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._allowed(scope):
            response = JSONResponse(
                error_body("missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           "authorization", 401),
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)
