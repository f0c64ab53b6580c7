"""The request/response cycle without I/O, shared by ``Client`` and ``AsyncClient``.

An operation is a generator: it yields ``Call`` (send this request, send me back the ``httpx.Response`` or the
``httpx.TransportError``) and ``Sleep`` (wait this long, send me back None), and returns its result. The two
clients only perform those two steps, one with blocking I/O, one with asyncio; building requests, retrying and
parsing responses happen here, once.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from hqclip_client.errors import APIConnectionError, APITimeoutError, status_error

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One HTTP request, relative to the client's base URL."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None

    def build(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        return http.build_request(self.method, self.path, json=self.json, params=self.params, files=self.files)


@dataclass(frozen=True)
class Sleep:
    seconds: float


Outcome = httpx.Response | httpx.TransportError | None
Plan = Generator[Call | Sleep, Outcome, T]


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures are retried and how long to wait: exponential backoff with jitter, at least Retry-After.

    Retried: 429 (the gateway's full queue), 503 with a Retry-After (a backend outage: the gateway says when to
    come back) and failures to connect (the request never arrived). Not retried: a 503 without Retry-After (the
    gateway's way of saying something is not configured, e.g. no LVLM), other errors, and read timeouts (the work
    may be running; repeating it doubles the load). A Retry-After above ``max_retry_after_s`` is not waited for.
    """

    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 20.0
    max_retry_after_s: float = 60.0
    statuses: tuple[int, ...] = (429, 503)

    def delay(self, attempt: int, outcome: Outcome) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to stop here."""
        if attempt >= self.max_retries:
            return None
        if isinstance(outcome, httpx.Response):
            if outcome.status_code not in self.statuses:
                return None
            asked = retry_after(outcome.headers.get("retry-after"))
            if outcome.status_code == 503 and asked is None:
                return None
        elif isinstance(outcome, (httpx.ConnectError, httpx.ConnectTimeout)):
            asked = None
        else:
            return None
        if asked is not None and asked > self.max_retry_after_s:
            return None
        backoff = min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
        return max(asked or 0.0, backoff)


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, given as seconds or as an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def exchange(call: Call, policy: RetryPolicy) -> Plan[Any]:
    """Send ``call`` until it succeeds or the policy gives up; the decoded JSON body, or the error raised."""
    attempt = 0
    while True:
        outcome = yield call
        wait = policy.delay(attempt, outcome)
        if wait is None:
            return parse(call, outcome)
        yield Sleep(wait)
        attempt += 1


def parse(call: Call, outcome: Outcome) -> Any:
    if isinstance(outcome, httpx.TimeoutException):
        raise APITimeoutError(f"{call.method} {call.path} timed out ({type(outcome).__name__}); "
                              "raise the client's timeout for large requests") from outcome
    if isinstance(outcome, httpx.TransportError):
        raise APIConnectionError(f"{call.method} {call.path}: cannot reach the gateway ({outcome}); "
                                 "check the URL and that the gateway runs") from outcome
    assert isinstance(outcome, httpx.Response)
    if outcome.status_code >= 400:
        raise status_error(outcome)
    if not outcome.content:
        return None
    return outcome.json()
