"""Provider-backed policy, expert, PRM and judge: the versioned prompts, the HTTP clients, the ledger, the parsers.

Each role builds its requests with cso_lib.prompts (expert, PRM, taxonomy judge) or sends the state itself
(policy), sends only what the ledger has not answered (`LedgerContext.cached`, filled by a join in the
stage), writes every answer to the journal as it arrives, and parses strictly (cso_lib.judge_parse). A judge answer that does
not parse is asked again (a new sample: `seed` = attempt) up to `parse_retries` times, then recorded as
unscored (the judge: unclassified), never given a default.

`record_sim_calls` writes the ledger rows of the simulation's roles when `sim.record_calls` is on: the
request each would send (the real prompt, hashed as a provider-backed role's request is), tokens
estimated as characters / 4 of the request's JSON (no tokenizer is installed; the same estimate as
`ChatRequest.estimate_input_tokens` and the fake test server), cost 0, status ok.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cso_lib.config import ModelConfig
from cso_lib.errors import ParseError
from cso_lib.judge_parse import parse_expert, parse_prm, parse_taxonomy
from cso_lib.ledger import Journal, ledger_row, result_from_row
from cso_lib.llm import AdaptiveLimiter, ChatRequest, ChatResult, RateLimits, make_client, run_all_sync
from cso_lib.llm.types import Usage
from cso_lib.messages import Message
from cso_lib.prompts import (
    EXPERT,
    PRM,
    TAXONOMY,
    expert_messages,
    expert_response_format,
    prm_messages,
    taxonomy_messages,
)

DEFAULT_URLS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
DEFERRED_ERROR = "no answer from the batch API (expired or failed after resubmission; see llm_batches)"


@dataclass
class LedgerContext:
    """What a stage hands a role for one batch: answered requests (by hash) and where new answers go."""

    stage: str
    run_id: str
    cached: dict[str, dict] = field(default_factory=dict)  # request_hash -> llm_calls row
    journal: Journal | None = None
    prices: dict = field(default_factory=dict)
    sent: int = 0  # requests actually sent in this batch (cache misses)
    defer: bool = False  # batch mode: cache misses are not sent but collected in `deferred` (cso_lib.batch_mode)
    deferred: list[ChatRequest] = field(default_factory=list)


def record_sim_calls(ctx: LedgerContext, model: str, role: str, calls: list[tuple[list[dict], Any, Any]]) -> None:
    """Ledger rows for a simulated role's batch: (prompt messages, response format, answer object) per call."""
    rows = []
    for messages, response_format, answer in calls:
        req = ChatRequest(model=model, messages=messages, response_format=response_format)
        text = json.dumps(answer, ensure_ascii=False)
        result = ChatResult(status="ok", choices=[{"role": "assistant", "content": text}], finish_reasons=["stop"],
                            usage=Usage(req.estimate_input_tokens(), 0, 0, max(1, math.ceil(len(text) / 4))),
                            attempts=1, request_hash=req.hash("sim"), provider="sim", model=model)
        rows.append({**ledger_row(result, ctx.stage, role, ctx.run_id, {}), "cost_usd": 0.0})
    ctx.sent += len(rows)
    if ctx.journal is not None:
        ctx.journal.extend(rows)


class LLMRole:
    records_calls = True

    def __init__(self, mc: ModelConfig, role: str, share: float, suffix: str = "") -> None:
        self.mc, self.role = mc, role
        self.name = f"{mc.provider}:{mc.model}{suffix}"
        self.client = make_client(mc.provider, mc.base_url or DEFAULT_URLS[mc.provider], mc.api_key_env)
        self.limiter = AdaptiveLimiter(
            RateLimits(mc.requests_per_minute, mc.input_tokens_per_minute, mc.output_tokens_per_minute),
            share=share,
        )

    def request(self, messages: list[Message], tools=None, response_format=None, attempt: int = 0,
                cache_key: str | None = None) -> ChatRequest:
        params = dict(self.mc.params)
        if attempt:
            params["seed"] = attempt  # a new sample after an answer that did not parse
        return ChatRequest(model=self.mc.model, messages=messages, tools=tools, params=params,
                           response_format=response_format, cache_key=cache_key)

    def hash(self, req: ChatRequest) -> str:
        return req.hash(self.client.provider)

    def complete(self, requests: list[ChatRequest], ctx: LedgerContext | None) -> list[ChatResult]:
        """Answers in order: ledger hits from ctx.cached, the rest sent (each journaled as it arrives)."""
        ctx = ctx or LedgerContext(stage="adhoc", run_id="adhoc")
        out: list[ChatResult | None] = [None] * len(requests)
        hashes = [self.hash(req) for req in requests]
        missing, first = [], {}  # identical requests in one batch are sent once
        for i, h in enumerate(hashes):
            row = ctx.cached.get(h)
            if row is not None:
                out[i] = result_from_row(row)
            elif h not in first:
                first[h] = i
                missing.append(i)

        def on_result(j: int, result: ChatResult) -> None:
            row = ledger_row(result, ctx.stage, self.role, ctx.run_id, ctx.prices)
            if ctx.journal is not None:
                ctx.journal.append(row)
            if result.ok:
                ctx.cached[row["request_hash"]] = row

        if missing and ctx.defer:  # batch mode: the driver submits these; until then they have no answer
            for i in missing:
                ctx.deferred.append(requests[i])
                out[i] = ChatResult(status="error", error=DEFERRED_ERROR, request_hash=hashes[i],
                                    provider=self.client.provider, model=self.mc.model)
        elif missing:
            ctx.sent += len(missing)
            sent = run_all_sync([requests[i] for i in missing], self.client, self.limiter,
                                max_attempts=self.mc.max_attempts, call_timeout_s=self.mc.timeout_s,
                                deadline_s=self.mc.deadline_s, concurrency=self.mc.concurrency, on_result=on_result)
            for i, result in zip(missing, sent, strict=True):
                out[i] = result
        return [r if r is not None else out[first[hashes[i]]] for i, r in enumerate(out)]

    def ask_strictly(self, build: Callable[[list[int], int], list[ChatRequest]], n: int,
                     parse: Callable[[str | None], Any], ctx: LedgerContext | None) -> tuple[list[Any], dict[int, str]]:
        """Ask n judge requests; an answer that does not parse is asked again (attempt 1, 2, ...: a new
        sample) up to `parse_retries` times. Returns (parsed value or None per request, why each None)."""
        parsed: list[Any] = [None] * n
        why: dict[int, str] = {}
        pending = list(range(n))
        for attempt in range(self.mc.parse_retries + 1):
            if not pending:
                break
            still = []
            for i, result in zip(pending, self.complete(build(pending, attempt), ctx), strict=True):
                if not result.ok:
                    why[i] = f"request failed: {result.error}"
                    continue  # the client already retried; an error answer is not re-asked here
                try:
                    parsed[i] = parse(result.text)
                except ParseError as e:
                    why[i] = f"unparsable judge answer: {e}"
                    still.append(i)
            pending = still
        return parsed, why


class LLMPRM(LLMRole):
    prompt_version = PRM.version

    def __init__(self, mc: ModelConfig, share: float) -> None:
        super().__init__(mc, "prm", share, f"|{PRM.version}")

    def chat_requests(self, requests, attempt: int = 0) -> list[ChatRequest]:
        return [self.request(prm_messages(r.state, r.tools, r.action), response_format=PRM.response_format(),
                             attempt=attempt, cache_key=r.trajectory_id) for r in requests]

    def all_hashes(self, requests) -> list[list[str]]:
        """Hashes of every attempt each request may need (for the ledger join before dispatch)."""
        per = [self.chat_requests(requests, a) for a in range(self.mc.parse_retries + 1)]
        return [[self.hash(reqs[i]) for reqs in per] for i in range(len(requests))]

    def score(self, requests, ctx: LedgerContext | None = None):
        from cso_lib.models import Score

        parsed, why = self.ask_strictly(lambda idx, a: self.chat_requests([requests[i] for i in idx], a),
                                        len(requests), parse_prm, ctx)
        return [Score(*p) if p is not None else Score(None, why.get(i, "unscored"), "unscored")
                for i, p in enumerate(parsed)]


class LLMJudge(LLMRole):
    """The error-taxonomy judge: one of prompts.CATEGORIES per verified critical step, or unclassified."""

    prompt_version = TAXONOMY.version

    def __init__(self, mc: ModelConfig, share: float) -> None:
        super().__init__(mc, "judge", share, f"|{TAXONOMY.version}")

    def chat_requests(self, requests, attempt: int = 0) -> list[ChatRequest]:
        return [self.request(taxonomy_messages(r.state, r.tools, r.rejected, r.chosen),
                             response_format=TAXONOMY.response_format(), attempt=attempt, cache_key=r.trajectory_id)
                for r in requests]

    def all_hashes(self, requests) -> list[list[str]]:
        per = [self.chat_requests(requests, a) for a in range(self.mc.parse_retries + 1)]
        return [[self.hash(reqs[i]) for reqs in per] for i in range(len(requests))]

    def classify(self, requests, ctx: LedgerContext | None = None):
        from cso_lib.models import Category

        parsed, why = self.ask_strictly(lambda idx, a: self.chat_requests([requests[i] for i in idx], a),
                                        len(requests), parse_taxonomy, ctx)
        return [Category(*p) if p is not None else Category(None, why.get(i, "unclassified"), "unclassified")
                for i, p in enumerate(parsed)]


class LLMExpert(LLMRole):
    prompt_version = EXPERT.version

    def __init__(self, mc: ModelConfig, share: float) -> None:
        super().__init__(mc, "expert", share, f"|{EXPERT.version}")

    def chat_requests(self, requests, k: int, attempt: int = 0) -> list[ChatRequest]:
        return [self.request(expert_messages(r.state, r.tools, k), response_format=expert_response_format(k, r.tools),
                             attempt=attempt, cache_key=r.trajectory_id) for r in requests]

    def all_hashes(self, requests, k: int) -> list[list[str]]:
        per = [self.chat_requests(requests, k, a) for a in range(self.mc.parse_retries + 1)]
        return [[self.hash(reqs[i]) for reqs in per] for i in range(len(requests))]

    def propose(self, requests, k: int, ctx: LedgerContext | None = None) -> list[list[Message]]:
        out: list[list[Message]] = [[] for _ in requests]
        pending = list(range(len(requests)))
        for attempt in range(self.mc.parse_retries + 1):
            if not pending:
                break
            results = self.complete(self.chat_requests([requests[i] for i in pending], k, attempt), ctx)
            still = []
            for i, result in zip(pending, results, strict=True):
                if not result.ok:
                    continue
                try:
                    out[i] = parse_expert(result.text, k, requests[i].tools).actions
                except ParseError:
                    still.append(i)
            pending = still
        return out


class LLMPolicy(LLMRole):
    """The policy continuing a branch: the state as the chat, the agent's own tools."""

    def __init__(self, mc: ModelConfig, share: float) -> None:
        super().__init__(mc, "policy", share)

    def act(self, requests, ctx: LedgerContext | None = None) -> list[Message]:
        # attempt=r.sample: repeated rollouts of a branch are distinct requests (own `seed`), not one cached answer
        reqs = [self.request(r.state, tools=r.tools, cache_key=r.trajectory_id, attempt=r.sample)
                for r in requests]
        out = []
        for result in self.complete(reqs, ctx):
            if result.ok and result.choices:
                out.append({"role": "assistant", **{k: v for k, v in result.choices[0].items() if k != "role"}})
            else:
                out.append({"role": "assistant", "content": f"[policy call failed: {result.error}]"})
        return out
