"""A client for OpenAI-compatible chat-completions servers (vLLM in production) that turns an image into a Refinement.

Several server URLs share the load round-robin; a server that refuses connections is skipped for a few seconds
and its request goes to the next one (failover). Server errors (5xx), timeouts and answers that are not the four
fields are retried a bounded number of times with exponential backoff; the server's own 4xx (a broken image, a
prompt too long) is not. At most ``concurrency`` requests are in flight at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import httpx

from services.refine import prompt as prompts
from services.refine.schema import RESPONSE_FORMAT, InvalidRefinement, Refinement, parse

COOLDOWN_S = 5.0  # how long a server that refused a connection is tried last


class RefinerUnavailable(RuntimeError):
    """No LVLM server is configured or reachable."""


class RefineRejected(ValueError):
    """The server refused this input (its 4xx); retrying will not help."""


class RefineFailed(RuntimeError):
    """Every attempt failed with a server error, a timeout or an unusable answer."""


class _Retryable(RuntimeError):
    pass


@dataclass
class RefineResult:
    refinement: Refinement
    model: str
    latency_ms: float
    url: str


def base_url(url: str) -> str:
    """``http://host:8000``, ``.../`` and ``.../v1`` all name the same OpenAI API root, ``.../v1``."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


class RefineClient:
    def __init__(
        self,
        urls: list[str],
        *,
        model: str | None = None,
        prompt: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        concurrency: int = 8,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.urls = [base_url(u) for u in urls]
        self.prompt = prompt or prompts.DEFAULT_PROMPT
        self.retries, self.backoff_s = retries, backoff_s
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self._model = model
        self._turn = itertools.count()
        self._down_until = dict.fromkeys(self.urls, 0.0)
        self._slots = asyncio.Semaphore(concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=concurrency * max(len(urls), 1)),
        )

    @classmethod
    def from_settings(cls, settings) -> RefineClient:
        """From a services.settings.RefineSettings."""
        return cls(
            settings.urls,
            model=settings.model,
            prompt=settings.prompt,
            api_key=settings.api_key,
            timeout_s=settings.timeout_s,
            retries=settings.retries,
            concurrency=settings.concurrency,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            seed=settings.seed,
        )

    def _order(self) -> list[str]:
        """This request's servers: the next in turn first, servers that lately refused connections last."""
        if not self.urls:
            raise RefinerUnavailable("no LVLM server configured: set HQCLIP_REFINE__URLS=http://HOST:8000/v1 "
                                     "(a vLLM server, see docs/refinement.md)")
        start = next(self._turn) % len(self.urls)
        order = self.urls[start:] + self.urls[:start]
        now = time.monotonic()
        return sorted(order, key=lambda url: self._down_until[url] > now)

    async def _send(self, method: str, path: str, **kwargs) -> tuple[str, httpx.Response]:
        """One call, to the first server that takes the connection; RefinerUnavailable when none does."""
        refused = []
        for url in self._order():
            try:
                response = await self._http.request(method, url + path, **kwargs)
            except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
                raise  # the server is there but slow: the caller retries
            except httpx.TransportError as exc:  # refused, reset or dropped: this server is down, try the next
                self._down_until[url] = time.monotonic() + COOLDOWN_S
                refused.append(f"{url} ({type(exc).__name__})")
                continue
            self._down_until[url] = 0.0
            return url, response
        raise RefinerUnavailable(f"no LVLM server reachable: {', '.join(refused)}; start vLLM there or fix "
                                 "HQCLIP_REFINE__URLS (see docs/refinement.md)")

    async def model_name(self) -> str:
        """The configured model, else the first one the servers list."""
        if self._model is None:
            try:
                url, response = await self._send("GET", "/models")
            except httpx.TimeoutException as exc:
                raise RefinerUnavailable(f"no LVLM server answered /models in time ({type(exc).__name__})") from None
            models = response.json().get("data") if response.status_code == 200 else None
            if not models:
                raise RefinerUnavailable(f"{url}/models lists no model (HTTP {response.status_code}); "
                                         "set HQCLIP_REFINE__MODEL")
            self._model = models[0]["id"]
        return self._model

    async def ready(self) -> bool:
        """True when some server answers /models."""
        try:
            _, response = await self._send("GET", "/models", timeout=2.0)
        except (RefinerUnavailable, httpx.HTTPError):
            return False
        return response.status_code == 200

    async def _complete(self, payload: dict) -> tuple[str, Refinement]:
        try:
            url, response = await self._send("POST", "/chat/completions", json=payload)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timed out ({type(exc).__name__})") from None
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retryable(f"{url} answered HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise RefineRejected(f"{url} refused the request (HTTP {response.status_code}): {response.text[:500]}")
        try:
            text = response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"{url} answered something that is not a chat completion: {response.text[:200]}") from None
        try:
            return url, parse(text)
        except InvalidRefinement as exc:
            raise _Retryable(f"{url} answered an unusable refinement: {exc}") from None

    async def refine(self, image: bytes, alt_text: str | None = None) -> RefineResult:
        """The four texts for one encoded image (JPEG, PNG, WebP, GIF or BMP) and its alt text."""
        messages = prompts.messages(image, alt_text, self.prompt)
        async with self._slots:
            start = time.perf_counter()
            model = await self.model_name()
            payload = {
                "model": model,
                "messages": messages,
                "response_format": RESPONSE_FORMAT,
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
            errors = []
            for attempt in range(self.retries + 1):
                if attempt:
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
                if self.seed is not None:
                    payload["seed"] = self.seed + attempt  # a retry of an unusable answer must not repeat it
                try:
                    url, refinement = await self._complete(payload)
                except (_Retryable, RefinerUnavailable) as exc:
                    errors.append(exc)
                    continue
                return RefineResult(refinement, model, (time.perf_counter() - start) * 1000, url)
        if all(isinstance(e, RefinerUnavailable) for e in errors):
            raise errors[-1]
        raise RefineFailed(f"refinement failed after {len(errors)} attempts; last: {errors[-1]}")

    async def aclose(self) -> None:
        await self._http.aclose()
