"""Async client for OpenAI-compatible Chat Completions: OpenAI, Azure OpenAI, `vllm serve`, gateways.

    client = OpenAICompatClient("https://api.openai.com/v1", "OPENAI_API_KEY")
    client = OpenAICompatClient("http://127.0.0.1:8000/v1", None)            # vllm serve, no key
    client = OpenAICompatClient("https://RES.openai.azure.com/openai/deployments/DEPLOYMENT",
                                "AZURE_OPENAI_API_KEY", azure_api_version="2024-10-21")

Sends `n`, tools, sampling params, `response_format` ({"type": "json_object"} for "json",
{"type": "json_schema", "json_schema": {"name", "schema", "strict": true}} for a schema: structured
outputs) and `prompt_cache_key` when the request has a cache key; reads
`usage.prompt_tokens_details.cached_tokens`. Azure: the key goes in the `api-key` header and
`api-version` in the query; elsewhere `Authorization: Bearer`.
"""

from __future__ import annotations

import time
from typing import Any

from cso_lib.errors import LLMResponseError
from cso_lib.llm.http import HTTPClient, Reply
from cso_lib.llm.types import ChatRequest, ChatResult, Usage, schema_of


def openai_response_format(response_format: Any) -> dict[str, Any] | None:
    if response_format is None:
        return None
    if response_format == "json":
        return {"type": "json_object"}
    name, schema, strict = schema_of(response_format)
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def openai_body(req: ChatRequest, *, send_cache_key: bool = True) -> dict[str, Any]:
    """The Chat Completions request body for `req` (also the `body` of a Batch API line)."""
    body: dict[str, Any] = {"model": req.model, "messages": req.messages}
    if req.tools:
        body["tools"] = req.tools
    for key, value in req.params.items():
        if key == "n" and value == 1:
            continue
        body[key] = value
    fmt = openai_response_format(req.response_format)
    if fmt is not None:
        body["response_format"] = fmt
    if req.cache_key and send_cache_key:
        body["prompt_cache_key"] = req.cache_key
    return body


def parse_openai_response(body: dict[str, Any], raw: str, *, n: int) -> ChatResult:
    """A Chat Completions response body as an ok ChatResult; LLMResponseError if fields are missing."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise LLMResponseError(f"response has no choices: {raw[:200]!r}")
    choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
    messages, reasons = [], []
    for c in choices:
        msg = c.get("message") if isinstance(c, dict) else None
        if not isinstance(msg, dict):
            raise LLMResponseError(f"response choice without a message: {raw[:200]!r}")
        messages.append({"role": "assistant", **{k: v for k, v in msg.items() if k != "role"}})
        reasons.append(str(c.get("finish_reason")))
    if len(messages) != n:
        raise LLMResponseError(f"asked for n={n} choices, got {len(messages)}")
    u = body.get("usage") or {}
    details = u.get("prompt_tokens_details") or {}
    usage = Usage(
        input_tokens=int(u.get("prompt_tokens") or 0),
        cached_input_tokens=int(details.get("cached_tokens") or 0),
        output_tokens=int(u.get("completion_tokens") or 0),
    )
    return ChatResult(status="ok", choices=messages, finish_reasons=reasons, usage=usage, raw=raw)


class OpenAICompatClient(HTTPClient):
    """Chat Completions over HTTP. `chat` makes one attempt; dispatch adds limits and retries."""

    provider = "openai"

    def __init__(
        self,
        base_url: str,
        api_key_env: str | None,
        *,
        azure_api_version: str | None = None,
        send_cache_key: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(base_url, api_key_env, **kw)
        self.azure_api_version = azure_api_version
        self.send_cache_key = send_cache_key

    def auth_headers(self) -> dict[str, str]:
        if self._key is None:
            return {}
        return {"api-key": self._key} if self.azure_api_version else {"Authorization": f"Bearer {self._key}"}

    def query(self) -> dict[str, str]:
        return {"api-version": self.azure_api_version} if self.azure_api_version else {}

    async def chat(self, req: ChatRequest) -> Reply:
        start = time.monotonic()
        resp = await self.send("POST", "/chat/completions", json=openai_body(req, send_cache_key=self.send_cache_key),
                               params=self.query())
        raw = resp.text
        result = parse_openai_response(self.parse_json(resp, "chat completion"), raw, n=req.n)
        result.latency_s = time.monotonic() - start
        result.http_statuses = [resp.status_code]
        return Reply(result, {k.lower(): v for k, v in resp.headers.items()})

