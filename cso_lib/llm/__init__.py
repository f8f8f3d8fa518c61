"""The model-call layer: provider clients, rate limiting, bounded retries, batch APIs and cost.

    from cso_lib.llm import ChatRequest, OpenAICompatClient, AdaptiveLimiter, RateLimits, run_all_sync
    client = OpenAICompatClient("http://127.0.0.1:8000/v1", None)
    limiter = AdaptiveLimiter(RateLimits(requests_per_minute=500), share=1 / 4)
    results = run_all_sync([ChatRequest(model="m", messages=[...])], client, limiter, on_result=print)

Each result carries `request_hash` (the ledger key, see `types.request_hash`), usage incl. cached tokens,
attempts and latency; `cost.cost_usd` prices it.
"""

from __future__ import annotations

from typing import Any

from cso_lib.errors import ConfigError
from cso_lib.llm.anthropic import AnthropicClient
from cso_lib.llm.batch import AnthropicBatchClient, BatchOutcome, BatchStatus, OpenAIBatchClient
from cso_lib.llm.cost import BATCH_DISCOUNT, cost_usd
from cso_lib.llm.dispatch import call_one, run_all, run_all_sync
from cso_lib.llm.http import HTTPClient
from cso_lib.llm.limits import AdaptiveLimiter, RateLimits
from cso_lib.llm.openai_compat import OpenAICompatClient
from cso_lib.llm.types import ChatRequest, ChatResult, Usage, request_hash


def make_client(provider: str, base_url: str, api_key_env: str | None, *, batch: bool = False, **kw: Any) -> HTTPClient:
    """The client for a provider name ("openai" covers Azure and vLLM's server; "anthropic")."""
    if provider == "openai":
        return (OpenAIBatchClient if batch else OpenAICompatClient)(base_url, api_key_env, **kw)
    if provider == "anthropic":
        return (AnthropicBatchClient if batch else AnthropicClient)(base_url, api_key_env, **kw)
    raise ConfigError(f"provider={provider!r} has no HTTP client (expected 'openai' or 'anthropic')")


__all__ = [
    "BATCH_DISCOUNT", "AdaptiveLimiter", "AnthropicBatchClient", "AnthropicClient", "BatchOutcome", "BatchStatus",
    "ChatRequest", "ChatResult", "HTTPClient", "OpenAIBatchClient", "OpenAICompatClient", "RateLimits", "Usage",
    "call_one", "cost_usd", "make_client", "request_hash", "run_all", "run_all_sync",
]
