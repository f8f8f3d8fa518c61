"""Provider-neutral request and result types of the model-call layer, and the ledger key.

A `ChatRequest` is an OpenAI-format chat (messages incl. tool calls and tool messages, OpenAI tool specs)
plus sampling params; each provider client translates it. A `ChatResult` is what one logical call gave,
after retries: OpenAI-format assistant messages (one per sample), token usage, latency, attempts.

>>> req = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], params={"temperature": 0})
>>> req.hash("openai") == request_hash("openai", "m", {"temperature": 0}, req.messages, None, None)
True
>>> len(req.hash("openai")), req.hash("openai") == req.hash("anthropic")
(64, False)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cso_lib.errors import LLMRequestError

Message = dict[str, Any]
ResponseFormat = None | Literal["json"] | dict[str, Any]

# Sampling params every client understands; other keys in `params` go to the provider verbatim
# (e.g. `top_k` for Anthropic, `reasoning_effort` for OpenAI) and are part of the request hash.
KNOWN_PARAMS = ("temperature", "top_p", "max_tokens", "n", "seed", "stop")


def canonical_json(value: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def clean_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """Params without None values, so {"seed": None} and {} hash alike."""
    return {k: v for k, v in (params or {}).items() if v is not None}


def request_hash(
    provider: str,
    model: str,
    params: dict[str, Any] | None,
    messages: list[Message],
    tools: list[dict[str, Any]] | None,
    response_format: ResponseFormat,
) -> str:
    """sha256 (hex) of the canonical JSON of everything that determines the answer: the ledger key.

    The cache key and metadata are left out: they change where a request is cached, not what it asks.
    """
    doc = {
        "provider": provider,
        "model": model,
        "params": clean_params(params),
        "messages": messages,
        "tools": tools or None,
        "response_format": response_format,
    }
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def schema_of(response_format: dict[str, Any]) -> tuple[str, dict[str, Any], bool]:
    """(name, JSON schema, strict) of a structured response format: a bare JSON schema, or one already in
    OpenAI's wrapper {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (as the prompt
    templates give it).

    >>> schema_of({"type": "object", "title": "Score"})
    ('Score', {'type': 'object', 'title': 'Score'}, True)
    >>> schema_of({"type": "json_schema", "json_schema": {"name": "prm", "schema": {"type": "object"}, "strict": False}})
    ('prm', {'type': 'object'}, False)
    """
    if response_format.get("type") == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        inner = response_format["json_schema"]
        return str(inner.get("name") or "response")[:64], inner.get("schema") or {}, bool(inner.get("strict", True))
    return str(response_format.get("title") or "response")[:64], response_format, True


@dataclass
class ChatRequest:
    """One chat call, provider-neutral (OpenAI chat format)."""

    model: str
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None  # OpenAI tool specs: {"type": "function", "function": {...}}
    params: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, max_tokens, n, seed, stop, ...
    response_format: ResponseFormat = None  # None, "json" (any JSON object) or a JSON schema (see schema_of)
    cache_key: str | None = None  # stable key of the shared trajectory prefix (prompt caching)
    metadata: dict[str, Any] = field(default_factory=dict)  # the caller's own; never sent, never hashed

    def __post_init__(self) -> None:
        if not isinstance(self.messages, list) or not self.messages:
            raise LLMRequestError(f"ChatRequest.messages must be a non-empty list, got {self.messages!r:.200}")
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
                raise LLMRequestError(f"ChatRequest.messages[{i}] has no valid role: {m!r:.200}")
        if self.response_format not in (None, "json") and not isinstance(self.response_format, dict):
            raise LLMRequestError(
                f"ChatRequest.response_format must be None, 'json' or a JSON schema dict, got {self.response_format!r}"
            )
        self.params = clean_params(self.params)
        n = self.params.get("n", 1)
        if not isinstance(n, int) or n < 1:
            raise LLMRequestError(f"ChatRequest.params['n'] must be a positive int, got {n!r}")

    @property
    def n(self) -> int:
        return int(self.params.get("n", 1))

    def hash(self, provider: str) -> str:
        return request_hash(provider, self.model, self.params, self.messages, self.tools, self.response_format)

    def estimate_input_tokens(self) -> int:
        """Rough input size before sending: characters of the JSON of messages and tools / 4."""
        chars = len(canonical_json(self.messages)) + (len(canonical_json(self.tools)) if self.tools else 0)
        return max(1, math.ceil(chars / 4))


@dataclass
class Usage:
    """Tokens of one logical call (all samples). `input_tokens` includes cached and cache-written ones."""

    input_tokens: int = 0
    cached_input_tokens: int = 0  # read from the provider's prompt cache (cheaper)
    cache_write_tokens: int = 0  # written to the prompt cache (Anthropic: dearer than plain input)
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))


@dataclass
class ChatResult:
    """What one logical call gave, after retries. Never holds the API key (texts are redacted)."""

    status: Literal["ok", "error"]
    choices: list[Message] = field(default_factory=list)  # OpenAI-format assistant messages, one per sample
    finish_reasons: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0  # from the first wait for a send slot to the final answer, incl. backoff
    attempts: int = 0
    http_statuses: list[int] = field(default_factory=list)  # one per attempt that got an HTTP answer
    error: str | None = None
    raw: str | None = None  # the provider's response JSON text (a JSON list when several calls made it)
    batch: bool = False  # answered by a batch API (priced at the batch discount)
    request_hash: str | None = None
    provider: str | None = None
    model: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def text(self) -> str | None:
        """Content of the first choice (None on error or for a pure tool call)."""
        return self.choices[0].get("content") if self.choices else None

    def to_record(self) -> dict[str, Any]:
        """A flat dict of plain values (JSON text for nested parts), e.g. for a ledger row."""
        return {
            "request_hash": self.request_hash,
            "provider": self.provider,
            "model": self.model,
            "status": self.status,
            "choices_json": json.dumps(self.choices, ensure_ascii=False),
            "finish_reasons": list(self.finish_reasons),
            "input_tokens": self.usage.input_tokens,
            "cached_input_tokens": self.usage.cached_input_tokens,
            "cache_write_tokens": self.usage.cache_write_tokens,
            "output_tokens": self.usage.output_tokens,
            "latency_s": self.latency_s,
            "attempts": self.attempts,
            "http_statuses": list(self.http_statuses),
            "error": self.error,
            "raw": self.raw,
            "batch": self.batch,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> ChatResult:
        return cls(
            status=rec["status"],
            choices=json.loads(rec["choices_json"] or "[]"),
            finish_reasons=list(rec["finish_reasons"] or []),
            usage=Usage(
                int(rec["input_tokens"] or 0), int(rec["cached_input_tokens"] or 0),
                int(rec["cache_write_tokens"] or 0), int(rec["output_tokens"] or 0),
            ),
            latency_s=float(rec["latency_s"] or 0.0),
            attempts=int(rec["attempts"] or 0),
            http_statuses=list(rec["http_statuses"] or []),
            error=rec["error"],
            raw=rec["raw"],
            batch=bool(rec["batch"]),
            request_hash=rec["request_hash"],
            provider=rec["provider"],
            model=rec["model"],
        )
