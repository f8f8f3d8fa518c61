"""Client-side rate limiting: job-wide budgets divided among concurrent tasks, adapted from 429s and headers.

`AdaptiveLimiter(RateLimits(requests_per_minute=..., input_tokens_per_minute=...,
output_tokens_per_minute=...), share=1 / tasks_at_once)` paces one task (one process / event loop; it is
thread-safe, so several loops in one Python worker may share it):

- Requests are paced evenly (a GCRA schedule: each request reserves the next free slot, so no burst and
  FIFO order, which keeps requests sharing a prompt prefix consecutive) at `rate = rpm * share * m *
  (1 - headroom)`. The headroom (2%) absorbs network jitter against a provider's sliding window.
- Input tokens are estimated before sending (characters of the request JSON / 4, see
  `ChatRequest.estimate_input_tokens`); output tokens are reserved as min(max_tokens, expected_output) per
  sample. Both come from token buckets (capacity `burst_s` seconds of budget) that may go into debt, and
  are reconciled with the actual usage when the answer arrives.
- Adaptation (AIMD on the multiplier m in [min_multiplier, 1]): a 429 cuts the rate, at most once per
  "epoch" (429s of requests sent before the last cut do not cut again), to the larger of `decrease` (0.7)
  x the current rate and the rate this limiter actually got answered over the last period (when a
  provider's window is full, that is this task's share of the real limit): configured at twice the real
  limit it lands near the real limit at the first 429, and a lone 429 from jitter costs little. Once a
  whole period has passed without a 429, every `increase_every_s` (period/4: 15 s for a minute) m grows by
  `fast_increase` (+10%) while below 90% of where the last cut came from, then by `increase` (+2%), never
  above 1, so the rate never exceeds the configured limit. Probing that slowly keeps 429s rare: a
  sliding-window provider only answers 429 once a whole window has filled, so faster probing overshoots
  before it hears back. The provider's own limit headers (`x-ratelimit-limit-requests`,
  `anthropic-ratelimit-requests-limit`) cap the rate at their value * share when lower than configured.
- On 429 every task of this limiter pauses until Retry-After (seconds, or an HTTP date; `retry-after-ms`
  too) plus up to 10% jitter; `...-remaining-requests: 0` with a reset (`x-ratelimit-reset-requests`
  like "1s" / "6m0s", or Anthropic's RFC 3339 `anthropic-ratelimit-requests-reset`) pauses likewise.

`period_s` is the length of the "minute" (tests shrink it together with the fake server's window).
Not aiolimiter: its leaky bucket has a fixed rate and cannot take tokens back or go into debt, both of which
adaptation and usage reconciliation need; the schedule here is ~40 lines of arithmetic.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations: '1s', '6m0s', '20ms', '1h2m3.5s'; a bare number is seconds.

    >>> parse_duration("6m0s"), parse_duration("20ms"), parse_duration("1.5"), parse_duration("soon")
    (360.0, 0.02, 1.5, None)
    """
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _seconds_until(stamp: datetime, now: float | None) -> float:
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return max(0.0, stamp.timestamp() - (time.time() if now is None else now))


def parse_reset(text: str, now: float | None = None) -> float | None:
    """Seconds until a reset given as a duration ('6m0s'), seconds, or an RFC 3339 time (Anthropic)."""
    seconds = parse_duration(text)
    if seconds is not None:
        return seconds
    try:
        return _seconds_until(datetime.fromisoformat(text.strip().replace("Z", "+00:00")), now)
    except ValueError:
        return None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `retry-after` (seconds or an HTTP date); None if absent.

    >>> parse_retry_after({"retry-after": "2"}), parse_retry_after({"retry-after-ms": "250"})
    (2.0, 0.25)
    >>> parse_retry_after({"retry-after": "Thu, 01 Jan 1970 00:00:10 GMT"}, now=4.0)
    6.0
    """
    if "retry-after-ms" in headers:
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return _seconds_until(parsedate_to_datetime(value), now)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class RateLimits:
    """Job-wide budgets of one model (None: unlimited). Per `period_s` (60: per minute)."""

    requests_per_minute: float | None = None
    input_tokens_per_minute: float | None = None
    output_tokens_per_minute: float | None = None
    period_s: float = 60.0


@dataclass
class Ticket:
    """One acquired send: what it reserved, when, and in which adaptation epoch."""

    sent_at: float
    epoch: int
    input_tokens: int
    output_tokens: int
    requests: int


class _Bucket:
    """Token bucket refilled at `rate`/s up to `capacity`; `take` may go into debt (negative level)."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate, self.capacity, self.level, self.t = rate, capacity, capacity, time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_for(self, n: float, now: float) -> float:
        self.refill(now)
        need = min(n, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, n: float) -> None:
        self.level = min(self.capacity, self.level - n)


class AdaptiveLimiter:
    """Paces one task's share of a model's job-wide budgets; adapts to 429s and rate-limit headers."""

    def __init__(
        self,
        limits: RateLimits,
        share: float = 1.0,
        *,
        expected_output_tokens: int = 256,
        headroom: float = 0.02,
        decrease: float = 0.7,
        increase: float = 0.02,
        fast_increase: float = 0.1,
        increase_every_s: float | None = None,
        min_multiplier: float = 0.05,
        burst_s: float | None = None,
        seed: int | None = None,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share={share!r} must be in (0, 1] (1 / number of concurrent tasks)")
        self.limits, self.share = limits, share
        self.expected_output_tokens = expected_output_tokens
        self.headroom, self.decrease, self.increase = headroom, decrease, increase
        self.fast_increase = fast_increase
        self._cut_from = 1.0  # the multiplier before the last cut
        self._answered: deque[tuple[float, int]] = deque()  # (sent_at, requests) answered, last period
        self._last_429 = 0.0
        self.increase_every_s = increase_every_s if increase_every_s is not None else limits.period_s / 4
        self.min_multiplier = min_multiplier
        burst = burst_s if burst_s is not None else limits.period_s / 10
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.multiplier = 1.0
        self.learned_rpm: float | None = None  # from the provider's limit header (job-wide)
        self._epoch, self._last_change = 0, time.monotonic()
        self._next_free = 0.0
        self._pause_until = 0.0
        self._buckets: dict[str, _Bucket] = {}
        for name, per_period in (("input", limits.input_tokens_per_minute), ("output", limits.output_tokens_per_minute)):
            if per_period:
                rate = per_period * share / limits.period_s
                self._buckets[name] = _Bucket(rate, max(1.0, rate * burst))
        self.sent = 0
        self.rate_limited = 0

    # ---- the current allowed rate --------------------------------------------------------------------
    def requests_per_s(self) -> float | None:
        """Requests per second this task may send now (None: unpaced)."""
        caps = [c for c in (self.limits.requests_per_minute, self.learned_rpm) if c]
        if not caps:
            return None
        return min(caps) * self.share * self.multiplier * (1 - self.headroom) / self.limits.period_s

    def _set_multiplier(self, m: float, now: float) -> None:
        self.multiplier = min(1.0, max(self.min_multiplier, m))
        self._last_change = now
        for name, b in self._buckets.items():
            per_period = (self.limits.input_tokens_per_minute if name == "input" else self.limits.output_tokens_per_minute)
            b.refill(now)
            b.rate = per_period * self.share * self.multiplier / self.limits.period_s  # type: ignore[operator]

    # ---- acquire / report ----------------------------------------------------------------------------
    def estimate_output(self, max_tokens: int | None, n: int = 1) -> int:
        return n * (min(max_tokens, self.expected_output_tokens) if max_tokens else self.expected_output_tokens)

    async def acquire(self, input_tokens: int = 0, output_tokens: int = 0, requests: int = 1) -> Ticket:
        """Wait for this task's next send slot and token budget; returns the ticket to report back with."""
        slot: float | None = None
        while True:
            with self._lock:
                now = time.monotonic()
                if now < self._pause_until:
                    slot, wait = None, self._pause_until - now
                else:
                    rate = self.requests_per_s()
                    if slot is None:  # reserve the next free slot (FIFO: keeps shared prefixes consecutive)
                        slot = max(now, self._next_free)
                        if rate:
                            self._next_free = slot + requests / rate
                    wait = slot - now
                    if wait <= 0:
                        wait = max((b.wait_for(n, now) for b, n in self._token_needs(input_tokens, output_tokens)),
                                   default=0.0)
                    if wait <= 0:
                        for b, n in self._token_needs(input_tokens, output_tokens):
                            b.take(n)
                        self.sent += requests
                        return Ticket(now, self._epoch, input_tokens, output_tokens, requests)
            await asyncio.sleep(wait)

    def _token_needs(self, input_tokens: int, output_tokens: int) -> list[tuple[_Bucket, int]]:
        pairs = [("input", input_tokens), ("output", output_tokens)]
        return [(self._buckets[name], n) for name, n in pairs if name in self._buckets]

    def on_success(self, ticket: Ticket, input_tokens: int, output_tokens: int,
                   headers: Mapping[str, str] | None = None) -> None:
        """Reconcile the token estimates with the actual usage; creep the rate back up."""
        with self._lock:
            now = time.monotonic()
            for b, n in self._token_needs(input_tokens - ticket.input_tokens, output_tokens - ticket.output_tokens):
                b.refill(now)
                b.take(n)
            self._observe(headers or {}, now)
            self._answered.append((ticket.sent_at, ticket.requests))
            while self._answered and self._answered[0][0] < now - self.limits.period_s:
                self._answered.popleft()
            quiet = now - self._last_429 >= self.limits.period_s  # a whole window without a 429
            if self.multiplier < 1 and quiet and now - self._last_change >= self.increase_every_s:
                step = self.fast_increase if self.multiplier < 0.9 * self._cut_from else self.increase
                self._set_multiplier(self.multiplier * (1 + step), now)

    def on_rate_limited(self, ticket: Ticket, retry_after: float | None,
                        headers: Mapping[str, str] | None = None) -> None:
        """A 429: pause everyone until Retry-After (+ jitter), cut the rate once per epoch."""
        with self._lock:
            now = time.monotonic()
            self.rate_limited += ticket.requests
            self._last_429 = now
            self._give_back(ticket, now)
            self._observe(headers or {}, now)
            if retry_after is not None:
                self._pause(now, retry_after)
            if ticket.epoch == self._epoch:
                self._epoch += 1
                self._cut_from = self.multiplier
                self._set_multiplier(max(self.multiplier * self.decrease, self._measured_multiplier(now)), now)

    def _measured_multiplier(self, now: float) -> float:
        """The multiplier that matches the rate answered (not 429) over the last period; 0 if unpaced."""
        while self._answered and self._answered[0][0] < now - self.limits.period_s:
            self._answered.popleft()
        rate = self.requests_per_s()
        if not rate:
            return 0.0
        got = sum(n for _, n in self._answered) / self.limits.period_s
        return min(self.multiplier, self.multiplier * got * (1 - self.headroom) / rate)

    def on_failure(self, ticket: Ticket, headers: Mapping[str, str] | None = None) -> None:
        """Another failure (5xx, timeout, bad body): give the token reservation back."""
        with self._lock:
            now = time.monotonic()
            self._give_back(ticket, now)
            self._observe(headers or {}, now)

    def _give_back(self, ticket: Ticket, now: float) -> None:
        for b, n in self._token_needs(ticket.input_tokens, ticket.output_tokens):
            b.refill(now)
            b.take(-n)

    def _pause(self, now: float, seconds: float) -> None:
        until = now + seconds * (1 + 0.1 * self._rng.random())
        self._pause_until = max(self._pause_until, until)
        self._next_free = max(self._next_free, self._pause_until)

    def _observe(self, headers: Mapping[str, str], now: float) -> None:
        """Learn the provider's request limit; pause while it says nothing remains until its reset."""
        for prefix, limit_key in (("x-ratelimit-", "limit-requests"), ("anthropic-ratelimit-", "requests-limit")):
            value = headers.get(prefix + limit_key)
            if value is None:
                continue
            try:
                self.learned_rpm = float(value)
            except ValueError:
                pass
        for remaining_key, reset_key in (
            ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
            ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
            ("anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset"),
            ("anthropic-ratelimit-input-tokens-remaining", "anthropic-ratelimit-input-tokens-reset"),
            ("anthropic-ratelimit-output-tokens-remaining", "anthropic-ratelimit-output-tokens-reset"),
        ):
            remaining, reset = headers.get(remaining_key), headers.get(reset_key)
            if remaining is None or reset is None:
                continue
            try:
                exhausted = float(remaining) <= 0
            except ValueError:
                continue
            seconds = parse_reset(reset) if exhausted else None
            if seconds is not None:
                self._pause(now, min(seconds, self.limits.period_s))

    def stats(self) -> dict[str, float | int | None]:
        rate = self.requests_per_s()
        return {
            "sent": self.sent,
            "rate_limited": self.rate_limited,
            "multiplier": round(self.multiplier, 4),
            "requests_per_period": None if rate is None else round(rate * self.limits.period_s, 3),
            "learned_rpm": self.learned_rpm,
        }
