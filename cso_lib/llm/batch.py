"""Batch APIs (half price, answers within 24 h): OpenAI Batch API and Anthropic Message Batches.

Submitted from the driver. `submit` returns the provider's batch id, which the caller stores (Delta) before
anything else; a restarted job calls `wait`/`status`/`results` with the stored id on a NEW client object
and resumes polling instead of resubmitting. Use the request hash as the `custom_id` (64 hex characters
fit both providers' limits), so results map straight onto the ledger.

    client = OpenAIBatchClient("https://api.openai.com/v1", "OPENAI_API_KEY")
    batch_id = asyncio.run(client.submit([(req.hash("openai"), req) for req in requests]))
    outcome = asyncio.run(client.wait(batch_id, poll_interval_s=60))
    outcome.results   # {custom_id: ChatResult(batch=True, ...)}: settled (ok, or refused for good)
    outcome.resubmit  # custom_ids to send again: expired, cancelled, transient errors, missing

OpenAI: the JSONL input is uploaded to /files (purpose=batch), the batch created at /batches
(endpoint /v1/chat/completions, completion_window 24h) and polled at /batches/{id} (validating,
in_progress, finalizing, completed, expired, failed, cancelling, cancelled); answers come from
output_file_id, failures from error_file_id (both via /files/{id}/content); the custom_ids submitted are
read back from input_file_id, so nothing but the batch id needs storing. A `failed` batch (rejected at
validation) raises LLMBatchError with the provider's errors.

Anthropic: POST /v1/messages/batches with [{custom_id, params}], poll /v1/messages/batches/{id}
(processing_status in_progress, canceling, ended), results from `results_url` (JSONL; result.type
succeeded, errored, canceled, expired). Only n = 1 per batch request.

Result classification: a 2xx answer is an ok result; 400/401/403/404/422 and Anthropic's
invalid_request_error are error results (resubmitting cannot help); everything else is resubmitted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cso_lib.errors import LLMBatchError, LLMError, LLMRequestError
from cso_lib.llm.anthropic import AnthropicClient, anthropic_body, from_anthropic_message
from cso_lib.llm.openai_compat import OpenAICompatClient, openai_body, parse_openai_response
from cso_lib.llm.types import ChatRequest, ChatResult

OPENAI_DONE = frozenset({"completed", "expired", "failed", "cancelled"})
FINAL_ERROR_STATUSES = frozenset({400, 401, 403, 404, 422})


@dataclass
class BatchStatus:
    """Where a provider batch stands."""

    batch_id: str
    status: str  # the provider's own word (OpenAI status / Anthropic processing_status)
    done: bool
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class BatchOutcome:
    """A finished batch: settled results by custom_id, and the custom_ids to submit again."""

    batch_id: str
    status: str
    results: dict[str, ChatResult]
    resubmit: list[str]


def _jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _check_ids(items: Sequence[tuple[str, ChatRequest]]) -> None:
    seen: set[str] = set()
    for cid, _ in items:
        if not cid or len(cid) > 64 or cid in seen:
            raise LLMRequestError(f"custom_id {cid!r} must be unique, non-empty and at most 64 characters")
        seen.add(cid)
    if not items:
        raise LLMRequestError("a batch needs at least one request")


def _error_result(model: str | None, text: str, status: int | None = None) -> ChatResult:
    return ChatResult(status="error", error=text, batch=True, attempts=1, provider=None, model=model,
                      http_statuses=[status] if status is not None else [])


class OpenAIBatchClient(OpenAICompatClient):
    """OpenAI Batch API (base_url ends in /v1, as for Chat Completions)."""

    async def submit(self, items: Sequence[tuple[str, ChatRequest]], *, metadata: dict[str, str] | None = None) -> str:
        """Upload the requests as JSONL and create the batch; returns its id (store it at once)."""
        _check_ids(items)
        lines = [
            json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                        "body": openai_body(req, send_cache_key=self.send_cache_key)}, ensure_ascii=False)
            for cid, req in items
        ]
        async with self:
            resp = await self.send("POST", "/files", data={"purpose": "batch"},
                                   files={"file": ("batch.jsonl", ("\n".join(lines) + "\n").encode(), "application/jsonl")})
            file_id = self.parse_json(resp, "file upload")["id"]
            body: dict[str, Any] = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                    "completion_window": "24h"}
            if metadata:
                body["metadata"] = metadata
            resp = await self.send("POST", "/batches", json=body)
            return str(self.parse_json(resp, "batch create")["id"])

    async def _get(self, batch_id: str) -> dict[str, Any]:
        async with self:
            return self.parse_json(await self.send("GET", f"/batches/{batch_id}"), "batch")

    async def status(self, batch_id: str) -> BatchStatus:
        b = await self._get(batch_id)
        return BatchStatus(batch_id, b["status"], b["status"] in OPENAI_DONE, dict(b.get("request_counts") or {}))

    async def cancel(self, batch_id: str) -> None:
        async with self:
            await self.send("POST", f"/batches/{batch_id}/cancel")

    async def _file(self, file_id: str | None) -> str:
        if not file_id:
            return ""
        async with self:
            return (await self.send("GET", f"/files/{file_id}/content")).text

    async def results(self, batch_id: str) -> BatchOutcome:
        """Results of a finished batch (completed, expired or cancelled)."""
        b = await self._get(batch_id)
        if b["status"] == "failed":
            raise LLMBatchError(f"batch {batch_id!r} failed: {json.dumps(b.get('errors'))[:500]}")
        if b["status"] not in OPENAI_DONE:
            raise LLMBatchError(f"batch {batch_id!r} is not finished (status {b['status']!r})")
        inputs = {line["custom_id"]: line["body"] for line in _jsonl(await self._file(b.get("input_file_id")))}
        results: dict[str, ChatResult] = {}
        resubmit: set[str] = set()
        for line in _jsonl(await self._file(b.get("output_file_id"))) + _jsonl(await self._file(b.get("error_file_id"))):
            cid = line.get("custom_id")
            if cid not in inputs or cid in results:
                continue
            body_in = inputs[cid]
            resp, err = line.get("response") or {}, line.get("error")
            code = resp.get("status_code")
            if err is None and code == 200:
                raw = json.dumps(resp.get("body"), ensure_ascii=False)
                try:
                    res = parse_openai_response(resp.get("body") or {}, raw, n=int(body_in.get("n", 1)))
                except LLMError:
                    resubmit.add(cid)
                    continue
                res.batch, res.attempts, res.http_statuses = True, 1, [200]
                res.provider, res.model = self.provider, body_in.get("model")
                results[cid] = res
                resubmit.discard(cid)
            elif err is None and code in FINAL_ERROR_STATUSES:
                text = self.redact(json.dumps(resp.get("body"), ensure_ascii=False)[:1000])
                results[cid] = _error_result(body_in.get("model"), f"HTTP {code}: {text}", code)
                results[cid].provider = self.provider
            else:
                resubmit.add(cid)
        resubmit |= set(inputs) - set(results)
        return BatchOutcome(batch_id, b["status"], results, sorted(resubmit))

    async def wait(self, batch_id: str, *, poll_interval_s: float = 60.0, timeout_s: float | None = None) -> BatchOutcome:
        """Poll until the batch is finished, then its results (also how a restarted job resumes)."""
        return await _wait(self, batch_id, poll_interval_s, timeout_s)


class AnthropicBatchClient(AnthropicClient):
    """Anthropic Message Batches."""

    async def submit(self, items: Sequence[tuple[str, ChatRequest]]) -> str:
        _check_ids(items)
        for cid, req in items:
            if req.n != 1:
                raise LLMRequestError(f"custom_id {cid!r}: Message Batches take n=1 per request, got n={req.n}")
        body = {"requests": [{"custom_id": cid, "params": anthropic_body(req, default_max_tokens=self.default_max_tokens)}
                             for cid, req in items]}
        async with self:
            return str(self.parse_json(await self.send("POST", "/v1/messages/batches", json=body), "batch create")["id"])

    async def _get(self, batch_id: str) -> dict[str, Any]:
        async with self:
            return self.parse_json(await self.send("GET", f"/v1/messages/batches/{batch_id}"), "batch")

    async def status(self, batch_id: str) -> BatchStatus:
        b = await self._get(batch_id)
        return BatchStatus(batch_id, b["processing_status"], b["processing_status"] == "ended",
                           dict(b.get("request_counts") or {}))

    async def cancel(self, batch_id: str) -> None:
        async with self:
            await self.send("POST", f"/v1/messages/batches/{batch_id}/cancel")

    async def results(self, batch_id: str) -> BatchOutcome:
        b = await self._get(batch_id)
        if b["processing_status"] != "ended" or not b.get("results_url"):
            raise LLMBatchError(f"batch {batch_id!r} has not ended (processing_status {b['processing_status']!r})")
        if not b["results_url"].startswith(self.base_url + "/"):  # the key goes only to the configured host
            raise LLMBatchError(f"batch {batch_id!r}: results_url {b['results_url']!r} is outside {self.base_url!r}")
        async with self:
            text = (await self.send("GET", b["results_url"])).text
        results: dict[str, ChatResult] = {}
        resubmit: list[str] = []
        for line in _jsonl(text):
            cid, result = line["custom_id"], line.get("result") or {}
            kind = result.get("type")
            if kind == "succeeded":
                try:
                    msg, finish, usage = from_anthropic_message(result["message"])
                except (LLMError, KeyError):
                    resubmit.append(cid)
                    continue
                results[cid] = ChatResult(status="ok", choices=[msg], finish_reasons=[finish], usage=usage,
                                          raw=json.dumps(result["message"], ensure_ascii=False), batch=True,
                                          attempts=1, http_statuses=[200], provider=self.provider,
                                          model=result["message"].get("model"))
            elif kind == "errored" and ((result.get("error") or {}).get("error") or {}).get("type") == "invalid_request_error":
                text = self.redact(json.dumps(result.get("error"), ensure_ascii=False)[:1000])
                results[cid] = _error_result(None, f"errored: {text}", 400)
                results[cid].provider = self.provider
            else:  # errored (server side), canceled, expired
                resubmit.append(cid)
        return BatchOutcome(batch_id, b["processing_status"], results, sorted(resubmit))

    async def wait(self, batch_id: str, *, poll_interval_s: float = 60.0, timeout_s: float | None = None) -> BatchOutcome:
        return await _wait(self, batch_id, poll_interval_s, timeout_s)


async def _wait(client: OpenAIBatchClient | AnthropicBatchClient, batch_id: str, poll_interval_s: float,
                timeout_s: float | None) -> BatchOutcome:
    start = time.monotonic()
    async with client:
        while True:
            st = await client.status(batch_id)
            if st.done:
                return await client.results(batch_id)
            if timeout_s is not None and time.monotonic() - start + poll_interval_s > timeout_s:
                raise LLMBatchError(f"batch {batch_id!r} still {st.status!r} after {timeout_s}s; poll it again later")
            await asyncio.sleep(poll_interval_s)
