"""Async client for the Anthropic Messages API, and the OpenAI <-> Anthropic message conversion.

    client = AnthropicClient("https://api.anthropic.com", "ANTHROPIC_API_KEY")

Requests: system messages become the `system` blocks; assistant `tool_calls` become `tool_use` blocks
(JSON-string arguments parsed); `tool` messages become `tool_result` blocks of a user turn; consecutive
turns of one role are merged (the API wants alternation); tools become {name, description, input_schema}.
`stop` -> `stop_sequences`; `seed` has no Anthropic equivalent and is not sent; `max_tokens` is required
by the API and defaults to `default_max_tokens`; other params go through verbatim (e.g. `top_k`).

Prompt caching (when the request has a cache key): `cache_control: {"type": "ephemeral"}` on the last
system block and on the last block of the message before the final one, i.e. the shared trajectory
prefix, the final message being the variable part (the action to score, the question to answer).

Structured output ("json" or a schema): a forced tool (`tool_choice`) whose input schema is the schema;
its input comes back as the JSON text of the assistant message's content. `n` > 1: n calls, the first
alone (it writes the prompt cache) and the others together (they read it); usage is summed.

Responses: text blocks -> content, `tool_use` -> OpenAI `tool_calls` with JSON-string arguments;
usage: input = input_tokens + cache_read_input_tokens + cache_creation_input_tokens, cached = cache reads,
cache_write = cache creation.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from cso_lib.errors import LLMRequestError, LLMResponseError
from cso_lib.llm.http import HTTPClient, Reply
from cso_lib.llm.types import ChatRequest, ChatResult, Message, Usage, schema_of

ANTHROPIC_VERSION = "2023-06-01"
OUTPUT_TOOL = "structured_output"  # the forced tool of structured output; its input is the answer
OUTPUT_TOOL_WRAPPED = "structured_output_value"  # same, for a non-object schema wrapped in {"value": ...}
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}
_CACHE = {"type": "ephemeral"}


def _text_blocks(content: Any) -> list[dict[str, Any]]:
    """OpenAI content (str or list of parts) as Anthropic blocks; empty texts dropped (the API refuses them)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
            if url.startswith("data:"):
                media_type, data = url[5:].split(";base64,", 1)
                blocks.append({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}})
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
        else:
            blocks.append(dict(part))  # already an Anthropic block
    return blocks


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    args = fn.get("arguments")
    try:
        parsed = json.loads(args) if isinstance(args, str) else (args or {})
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):  # a malformed call in a logged trajectory: keep its text
        parsed = {"_raw_arguments": args}
    return {"type": "tool_use", "id": call.get("id") or "", "name": fn.get("name") or "", "input": parsed}


def to_anthropic_messages(
    messages: list[Message], *, cache_prefix: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """OpenAI chat messages -> (Anthropic system blocks, Anthropic messages).

    >>> system, msgs = to_anthropic_messages([
    ...     {"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
    ...     {"role": "assistant", "content": None, "tool_calls": [
    ...         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
    ...     {"role": "tool", "tool_call_id": "c1", "content": "42"}])
    >>> system, [(m["role"], [b["type"] for b in m["content"]]) for m in msgs]
    ([{'type': 'text', 'text': 'be brief'}], [('user', ['text']), ('assistant', ['tool_use']), ('user', ['tool_result'])])
    """
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role in ("system", "developer"):
            system.extend(_text_blocks(m.get("content")))
            continue
        if role == "assistant":
            blocks = _text_blocks(m.get("content")) + [_tool_use(c) for c in m.get("tool_calls") or []]
            turn = "assistant"
        elif role == "tool":
            content = m.get("content")
            result = content if isinstance(content, str) else _text_blocks(content)
            blocks = [{"type": "tool_result", "tool_use_id": m.get("tool_call_id") or "", "content": result}]
            turn = "user"
        elif role == "user":
            blocks, turn = _text_blocks(m.get("content")), "user"
        else:
            raise LLMRequestError(f"messages[{i}].role={role!r} cannot be sent to Anthropic")
        if not blocks:
            continue
        if out and out[-1]["role"] == turn:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": turn, "content": blocks})
    for turn in out:  # tool results must open their user turn
        turn["content"].sort(key=lambda b: b.get("type") != "tool_result")
    if cache_prefix:
        if system:
            system[-1]["cache_control"] = dict(_CACHE)
        if len(out) >= 2:
            out[-2]["content"][-1]["cache_control"] = dict(_CACHE)
    return system, out


def to_anthropic_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI tool specs -> Anthropic {name, description, input_schema}."""
    out = []
    for t in tools or []:
        fn = t.get("function", t)
        spec = {"name": fn["name"], "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
        if fn.get("description"):
            spec["description"] = fn["description"]
        out.append(spec)
    return out


def _output_tool(response_format: Any) -> dict[str, Any]:
    """The forced tool whose input is the structured answer (a non-object schema is wrapped in "value")."""
    value_schema = {"type": "object"} if response_format == "json" else schema_of(response_format)[1]
    if value_schema.get("type") == "object":
        name, schema = OUTPUT_TOOL, value_schema
    else:
        name = OUTPUT_TOOL_WRAPPED
        schema = {"type": "object", "properties": {"value": value_schema}, "required": ["value"]}
    return {"name": name, "description": "Give the answer as JSON in this tool's input.", "input_schema": schema}


def anthropic_body(req: ChatRequest, *, default_max_tokens: int = 4096) -> dict[str, Any]:
    """The Messages API request body for one sample of `req` (also a Message Batches `params`)."""
    system, messages = to_anthropic_messages(req.messages, cache_prefix=bool(req.cache_key))
    body: dict[str, Any] = {"model": req.model, "max_tokens": default_max_tokens, "messages": messages}
    if system:
        body["system"] = system
    for key, value in req.params.items():
        if key in ("n", "seed"):
            continue
        if key == "stop":
            body["stop_sequences"] = [value] if isinstance(value, str) else list(value)
        else:
            body[key] = value
    tools = to_anthropic_tools(req.tools)
    if req.response_format is not None:
        tool = _output_tool(req.response_format)
        tools.append(tool)
        body["tool_choice"] = {"type": "tool", "name": tool["name"]}
    if tools:
        body["tools"] = tools
    return body


def from_anthropic_message(body: dict[str, Any]) -> tuple[Message, str, Usage]:
    """A Messages API response -> (OpenAI assistant message, finish reason, usage).

    The forced output tool's input becomes the message content (JSON text), not a tool call.
    """
    content = body.get("content")
    if not isinstance(content, list):
        raise LLMResponseError(f"Anthropic response has no content list: {json.dumps(body)[:200]!r}")
    texts, calls = [], []
    structured = None
    for block in content:
        if block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            if block.get("name") in (OUTPUT_TOOL, OUTPUT_TOOL_WRAPPED):
                value = block.get("input")
                if block.get("name") == OUTPUT_TOOL_WRAPPED and isinstance(value, dict):
                    value = value.get("value")
                structured = json.dumps(value, ensure_ascii=False)
            else:
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block.get("name"),
                                           "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
    msg: Message = {"role": "assistant", "content": structured if structured is not None else ("".join(texts) or None)}
    if calls:
        msg["tool_calls"] = calls
    finish = "stop" if structured is not None else _FINISH.get(str(body.get("stop_reason")), str(body.get("stop_reason")))
    u = body.get("usage") or {}
    read, write = int(u.get("cache_read_input_tokens") or 0), int(u.get("cache_creation_input_tokens") or 0)
    usage = Usage(input_tokens=int(u.get("input_tokens") or 0) + read + write, cached_input_tokens=read,
                  cache_write_tokens=write, output_tokens=int(u.get("output_tokens") or 0))
    return msg, finish, usage


class AnthropicClient(HTTPClient):
    """Messages API over HTTP. `chat` makes one attempt (n HTTP calls for n samples)."""

    provider = "anthropic"

    def __init__(self, base_url: str = "https://api.anthropic.com", api_key_env: str | None = "ANTHROPIC_API_KEY",
                 *, default_max_tokens: int = 4096, **kw: Any) -> None:
        super().__init__(base_url, api_key_env, **kw)
        self.default_max_tokens = default_max_tokens

    def auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if self._key is not None:
            headers["x-api-key"] = self._key
        return headers

    def http_calls(self, req: ChatRequest) -> int:
        return req.n

    async def _one(self, body: dict[str, Any]) -> tuple[Message, str, Usage, str, dict[str, str]]:
        resp = await self.send("POST", "/v1/messages", json=body)
        msg, finish, usage = from_anthropic_message(self.parse_json(resp, "message"))
        return msg, finish, usage, resp.text, {k.lower(): v for k, v in resp.headers.items()}

    async def chat(self, req: ChatRequest) -> Reply:
        start = time.monotonic()
        body = anthropic_body(req, default_max_tokens=self.default_max_tokens)
        parts = [await self._one(body)]
        tasks = [asyncio.ensure_future(self._one(body)) for _ in range(req.n - 1)]
        try:
            parts += await asyncio.gather(*tasks)
        finally:  # one failed (or we were cancelled): stop the others
            for t in tasks:
                t.cancel()
        usage = Usage()
        for p in parts:
            usage = usage + p[2]
        raw = parts[0][3] if len(parts) == 1 else "[" + ",".join(p[3] for p in parts) + "]"
        result = ChatResult(status="ok", choices=[p[0] for p in parts], finish_reasons=[p[1] for p in parts],
                            usage=usage, raw=raw, latency_s=time.monotonic() - start,
                            http_statuses=[200] * len(parts))
        return Reply(result, parts[-1][4])
