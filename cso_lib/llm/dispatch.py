"""Run many chat requests through one client under a rate limiter: bounded retries, timeouts, deadlines.

    results = run_all_sync(requests, client, limiter, max_attempts=5, call_timeout_s=60, deadline_s=600,
                           concurrency=16, on_result=lambda i, r: ledger.append(i, r))

- `concurrency` workers take requests in order (requests sharing a prompt prefix go out consecutively).
- Each attempt waits for the limiter, then runs under `call_timeout_s` (capped by what is left of the
  deadline). Retried (tenacity) on 429/529, 408/409/5xx, timeouts, dropped connections, malformed or
  truncated bodies: after Retry-After (+ jitter) when the provider gave one, else exponential backoff with
  full jitter. Never retried: 400/401/403/404/422 and requests that cannot be built.
- At most `max_attempts` attempts per request, and no attempt starts after `deadline_s` from the first.
- A request that fails for good gives a ChatResult with status "error" (the error text redacted of the API
  key); only a bug (or an exception raised by `on_result`) stops the run.
- `on_result(i, result)` runs as soon as request i is settled (it may be async), so the caller can make
  each response durable within seconds of its arrival.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_before_delay
from tenacity.wait import wait_random_exponential

from cso_lib.errors import LLMError, LLMRateLimitError, LLMTimeoutError
from cso_lib.llm.http import HTTPClient
from cso_lib.llm.limits import AdaptiveLimiter, RateLimits
from cso_lib.llm.types import ChatRequest, ChatResult

OnResult = Callable[[int, ChatResult], Awaitable[None] | None]


def _retryable(e: BaseException) -> bool:
    return isinstance(e, LLMError) and e.retryable


class _Wait:
    """Retry-After (+ up to 10% jitter) when given, else exponential backoff with full jitter."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self.exp = wait_random_exponential(multiplier=base_s, max=max_s)

    def __call__(self, state: RetryCallState) -> float:
        e = state.outcome.exception() if state.outcome else None
        backoff = self.exp(state)
        if isinstance(e, LLMError) and e.retry_after is not None:
            return e.retry_after * (1 + 0.1 * (backoff / max(self.exp.max, 1e-9)))
        return backoff


async def call_one(
    req: ChatRequest,
    client: HTTPClient,
    limiter: AdaptiveLimiter,
    *,
    max_attempts: int = 5,
    call_timeout_s: float = 120.0,
    deadline_s: float = 900.0,
    backoff_base_s: float = 0.5,
    backoff_max_s: float = 30.0,
) -> ChatResult:
    """One request with limits and bounded retries; never raises an LLMError (gives an error result)."""
    statuses: list[int] = []
    attempts = 0
    start = time.monotonic()
    est_in = req.estimate_input_tokens()
    est_out = limiter.estimate_output(req.params.get("max_tokens"), req.n)
    retrying = AsyncRetrying(
        stop=stop_after_attempt(max_attempts) | stop_before_delay(deadline_s),
        wait=_Wait(backoff_base_s, backoff_max_s),
        retry=retry_if_exception(_retryable),
        reraise=True,
    )
    result: ChatResult
    try:
        async for attempt in retrying:
            with attempt:
                attempts += 1
                try:
                    async with asyncio.timeout(max(0.001, deadline_s - (time.monotonic() - start))):
                        ticket = await limiter.acquire(est_in, est_out, client.http_calls(req))
                except TimeoutError:
                    raise LLMTimeoutError(f"deadline of {deadline_s}s passed waiting for the rate limiter") from None
                timeout = max(0.001, min(call_timeout_s, deadline_s - (time.monotonic() - start)))
                try:
                    async with asyncio.timeout(timeout):
                        reply = await client.chat(req)
                except TimeoutError:
                    limiter.on_failure(ticket)
                    raise LLMTimeoutError(f"no answer within {timeout:.3g}s (attempt {attempts})") from None
                except LLMRateLimitError as e:
                    statuses.append(e.status or 429)
                    limiter.on_rate_limited(ticket, e.retry_after, e.headers)
                    raise
                except LLMError as e:
                    if e.status is not None:
                        statuses.append(e.status)
                    limiter.on_failure(ticket, e.headers)
                    raise
                result = reply.result
                limiter.on_success(ticket, result.usage.input_tokens, result.usage.output_tokens, reply.headers)
                statuses.extend(result.http_statuses)
    except LLMError as e:
        result = ChatResult(status="error", error=client.redact(f"{type(e).__name__}: {e}"))
    result.attempts = attempts
    result.http_statuses = statuses
    result.latency_s = time.monotonic() - start
    result.request_hash = req.hash(client.provider)
    result.provider, result.model = client.provider, req.model
    return result


async def run_all(
    requests: Sequence[ChatRequest],
    client: HTTPClient,
    limiter: AdaptiveLimiter | None = None,
    *,
    max_attempts: int = 5,
    call_timeout_s: float = 120.0,
    deadline_s: float = 900.0,
    concurrency: int = 16,
    on_result: OnResult | None = None,
    **retry_kw: Any,
) -> list[ChatResult]:
    """Results of `requests`, in order. See the module docstring for retries, limits and `on_result`."""
    if max_attempts < 1 or concurrency < 1:
        raise ValueError(f"max_attempts={max_attempts!r} and concurrency={concurrency!r} must be >= 1")
    limiter = limiter or AdaptiveLimiter(RateLimits())
    results: list[ChatResult | None] = [None] * len(requests)
    queue: Iterable[tuple[int, ChatRequest]] = iter(list(enumerate(requests)))

    async def worker() -> None:
        for i, req in queue:  # a shared iterator: each request is taken by exactly one worker, in order
            res = await call_one(req, client, limiter, max_attempts=max_attempts, call_timeout_s=call_timeout_s,
                                 deadline_s=deadline_s, **retry_kw)
            results[i] = res
            if on_result is not None:
                done = on_result(i, res)
                if inspect.isawaitable(done):
                    await done

    async with client:
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(concurrency, len(requests))):
                    tg.create_task(worker())
        except ExceptionGroup as eg:  # a bug or an on_result failure: raise it as itself
            raise eg.exceptions[0] from None
    return [r for r in results if r is not None]


def run_all_sync(requests: Sequence[ChatRequest], client: HTTPClient, limiter: AdaptiveLimiter | None = None,
                 **kw: Any) -> list[ChatResult]:
    """`run_all` on its own event loop, for synchronous code such as a Spark pandas/Arrow UDF.

    Must not be called from a thread that already runs an event loop (use `await run_all(...)` there).
    """
    return asyncio.run(run_all(requests, client, limiter, **kw))
