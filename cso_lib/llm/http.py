"""The HTTP base shared by the provider clients: API key from the environment, one httpx pool, errors.

The API key is read from the environment variable named in the configuration and kept in a private
attribute: it is left out of repr, pickles (re-read from the environment on unpickling, e.g. in a Spark
executor) and every error text, which goes through `redact` first. httpx itself logs request lines only
(method, URL, status), never headers.

Error mapping (what dispatch retries): 429/529 -> LLMRateLimitError; 408/409/5xx -> LLMTransientError;
other 4xx -> LLMRequestError (never retried); timeouts -> LLMTimeoutError; dropped connections,
truncated or non-JSON bodies -> LLMResponseError.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import httpx

from cso_lib.errors import (
    ConfigError,
    LLMError,
    LLMRateLimitError,
    LLMRequestError,
    LLMResponseError,
    LLMTimeoutError,
    LLMTransientError,
)
from cso_lib.llm.limits import parse_retry_after
from cso_lib.llm.types import ChatRequest, ChatResult

RATE_LIMIT_STATUSES = frozenset({429, 529})
TRANSIENT_STATUSES = frozenset({408, 409, 500, 502, 503, 504})


class Reply:
    """A single-attempt answer: the result and the response headers (for the rate limiter)."""

    __slots__ = ("result", "headers")

    def __init__(self, result: ChatResult, headers: dict[str, str]) -> None:
        self.result, self.headers = result, headers


class HTTPClient:
    """Base of the provider clients: `async with client:` opens the connection pool on the running loop."""

    provider = "http"

    def __init__(
        self,
        base_url: str,
        api_key_env: str | None,
        *,
        timeout_s: float = 120.0,
        max_connections: int = 64,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.extra_headers = dict(extra_headers or {})
        self._key = self._read_key(api_key_env)
        self._http: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._users = 0

    @staticmethod
    def _read_key(env: str | None) -> str | None:
        if env is None:
            return None
        key = os.environ.get(env)
        if not key:
            raise ConfigError(f"api_key_env={env!r}: that environment variable is not set or empty")
        return key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_key", "_http", "_loop", "_users")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._key = self._read_key(self.api_key_env)
        self._http, self._loop, self._users = None, None, 0

    # ---- connection pool, one per event loop -----------------------------------------------------------
    async def __aenter__(self) -> HTTPClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                limits=httpx.Limits(max_connections=self.max_connections,
                                    max_keepalive_connections=self.max_connections),
            )
            self._loop, self._users = loop, 0
        self._users += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._users -= 1
        if self._users <= 0 and self._http is not None:
            http, self._http, self._loop = self._http, None, None
            await http.aclose()

    # ---- what subclasses provide ---------------------------------------------------------------------
    def auth_headers(self) -> dict[str, str]:
        raise NotImplementedError

    def http_calls(self, req: ChatRequest) -> int:
        """HTTP requests one chat() makes (counted by the rate limiter)."""
        return 1

    async def chat(self, req: ChatRequest) -> Reply:
        """One attempt at a chat call; raises an LLMError subclass on failure."""
        raise NotImplementedError

    # ---- helpers -------------------------------------------------------------------------------------
    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key and text else text

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base_url}{path}"

    async def send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Send one HTTP request with auth; map transport failures and non-2xx statuses to LLMErrors."""
        if self._http is None:
            raise LLMRequestError(f"{type(self).__name__} is not open: use `async with client:`")
        headers = {**self.auth_headers(), **self.extra_headers, **kw.pop("headers", {})}
        try:
            resp = await self._http.request(method, self.url(path), headers=headers, **kw)
        except httpx.TimeoutException as e:
            raise LLMTimeoutError(self.redact(f"{method} {path}: timed out ({type(e).__name__})")) from None
        except (httpx.TransportError, httpx.DecodingError) as e:
            raise LLMResponseError(self.redact(f"{method} {path}: {type(e).__name__}: {e}")) from None
        if resp.status_code >= 300:
            raise self.status_error(method, path, resp)
        return resp

    def status_error(self, method: str, path: str, resp: httpx.Response) -> LLMError:
        headers = {k.lower(): v for k, v in resp.headers.items()}
        status = resp.status_code
        msg = self.redact(f"{method} {path}: HTTP {status}: {resp.text[:500]}")
        kw: dict[str, Any] = {"status": status, "headers": headers}
        if status in RATE_LIMIT_STATUSES:
            return LLMRateLimitError(msg, retry_after=parse_retry_after(headers), **kw)
        if status in TRANSIENT_STATUSES or status >= 500:
            return LLMTransientError(msg, retry_after=parse_retry_after(headers), **kw)
        return LLMRequestError(msg, **kw)

    def parse_json(self, resp: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = json.loads(resp.content)
        except (ValueError, UnicodeDecodeError) as e:
            raise LLMResponseError(
                self.redact(f"{what}: response body is not JSON ({e}): {resp.text[:200]!r}"), status=resp.status_code
            ) from None
        if not isinstance(body, dict):
            raise LLMResponseError(f"{what}: response body is not a JSON object", status=resp.status_code)
        return body
