"""Batch mode of the offline model stages: the requests the ledger lacks go out as provider batches.

With `<role>.batch: true` (OpenAI Batch API, Anthropic Message Batches: half price, answers within 24 h) a
stage runs `run_batches` on the driver before its usual executor pass:

1. Batches this stage and run submitted earlier and never collected (`llm_batches`, a crashed or stopped
   job) are polled, not submitted again.
2. Plan: the executors build the stage's requests exactly as the online path would, joined with the ledger
   (`ledger_cache`), and return those it would send (`LedgerContext(defer=True)`), nothing sent.
3. The driver submits them in batches of at most `batch_max_requests`, with the request hash as
   `custom_id`. Each batch id is fsynced to `<journal>/batches/` the moment the provider returns it and then
   written to the Delta table `llm_batches`, so a kill -9 right after the submission cannot submit it twice.
4. It polls every `batch_poll_s` until the batches end (at most `batch_wait_s` in this job: after that it
   stops with a StageError, and a rerun resumes polling the stored ids). Results go to the journal and the
   ledger (`llm_calls`, `batch` = true, priced at the batch discount).
5. Requests that expired, were cancelled or failed on the provider's side go back to the queue and are
   submitted again, each at most `batch_resubmits` more times; then they are recorded in the ledger as
   errors. Answers that do not parse make new requests (the judge's re-asks, `seed` = attempt), so steps
   2-5 repeat until the plan is empty (bounded by the parse retries and resubmits).

The stage's executor pass then finds every answer in the ledger; it runs with `defer=True`, so it never
sends a request online: a request the batches could not answer is stored unscored with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from cso_lib.config import Config
from cso_lib.delta_io import merge, read_table
from cso_lib.errors import LLMBatchError, LLMError, StageError
from cso_lib.ledger import Journal, flush_journal, ledger_row
from cso_lib.llm import BatchOutcome, ChatRequest, ChatResult, make_client
from cso_lib.llm_models import DEFAULT_URLS, LedgerContext, LLMRole
from schemas.tables import LLM_BATCHES

log = logging.getLogger(__name__)

# What the plan pass returns: one row per request the executor path would send now.
PLANNED = StructType([StructField("request_hash", StringType(), False), StructField("request_json", StringType(), False)])


def request_to_json(req: ChatRequest) -> str:
    return json.dumps({"model": req.model, "messages": req.messages, "tools": req.tools, "params": req.params,
                       "response_format": req.response_format, "cache_key": req.cache_key}, ensure_ascii=False)


def planned_rows(ctx: LedgerContext, provider: str) -> list[dict[str, Any]]:
    """The requests a deferring LedgerContext collected, as PLANNED rows (executor side)."""
    return [{"request_hash": req.hash(provider), "request_json": request_to_json(req)} for req in ctx.deferred]


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _batch_journal(cfg: Config) -> Path:
    return Path(cfg.journal_path) / "batches"


def fold_batch_journal(spark: SparkSession, cfg: Config) -> int:
    """Write batch ids fsynced by a job that died before its Delta write into `llm_batches`."""
    folder = _batch_journal(cfg)
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    rows = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by the crash: that submission's id never came back
    if rows:
        for r in rows:
            r["submitted_at"] = datetime.fromisoformat(r["submitted_at"])
        merge(spark, cfg, "llm_batches", spark.createDataFrame(rows, LLM_BATCHES))
    for f in files:
        f.unlink(missing_ok=True)
    return len(rows)


def _record_submission(spark: SparkSession, cfg: Config, row: dict[str, Any]) -> None:
    folder = _batch_journal(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.jsonl"
    with open(path, "a", encoding="utf-8") as f:  # durable before anything else happens
        f.write(json.dumps({**row, "submitted_at": row["submitted_at"].isoformat()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    merge(spark, cfg, "llm_batches", spark.createDataFrame([row], LLM_BATCHES))
    path.unlink(missing_ok=True)


def _retrying() -> AsyncRetrying:
    """Polls and downloads are retried (a poll is idempotent): transient errors, 429s, timeouts."""
    return AsyncRetrying(stop=stop_after_attempt(6), wait=wait_random_exponential(multiplier=0.5, max=20),
                         retry=retry_if_exception(lambda e: isinstance(e, LLMError) and e.retryable), reraise=True)


class BatchRunner:
    """Submits, polls and collects one role's batches for one stage of one run (driver side)."""

    def __init__(self, spark: SparkSession, cfg: Config, stage: str, run_id: str, role: LLMRole) -> None:
        self.spark, self.cfg, self.stage, self.run_id, self.role = spark, cfg, stage, run_id, role
        mc = role.mc
        self.mc = mc
        self.client = make_client(mc.provider, mc.base_url or DEFAULT_URLS[mc.provider], mc.api_key_env, batch=True,
                                  timeout_s=mc.timeout_s)
        self.provider = self.client.provider
        self.stats = {"batches_submitted": 0, "batches_resumed": 0, "batch_requests": 0, "batch_ok": 0,
                      "batch_errors": 0, "batch_resubmitted": 0, "batch_given_up": 0}
        self.journal = Journal(cfg.journal_path)
        self.given_up: set[str] = set()

    # ---- llm_batches ----------------------------------------------------------------------------------
    def _mine(self) -> DataFrame:
        return read_table(self.spark, self.cfg, "llm_batches").where(
            (F.col("stage") == self.stage) & (F.col("run_id") == self.run_id) & (F.col("role") == self.role.role)
            & (F.col("provider") == self.provider) & (F.col("model") == self.mc.model))

    def open_batches(self) -> list[dict[str, Any]]:
        return [r.asDict() for r in self._mine().where(~F.col("collected")).collect()]

    def refused(self) -> set[str]:
        """Requests a batch of this stage and run answered with a final error (e.g. HTTP 400): not resent."""
        calls = read_table(self.spark, self.cfg, "llm_calls").where(
            F.col("batch") & (F.col("status") != "ok") & (F.col("stage") == self.stage)
            & (F.col("run_id") == self.run_id))
        return {r["request_hash"] for r in calls.select("request_hash").collect()}

    def submissions(self) -> dict[str, int]:
        """How often each request hash was submitted in this stage and run."""
        rows = self._mine().select(F.explode("request_hashes").alias("h")).groupBy("h").count().collect()
        return {r["h"]: r["count"] for r in rows}

    # ---- submit / poll / collect ----------------------------------------------------------------------
    def submit(self, items: list[tuple[str, ChatRequest]]) -> dict[str, Any]:
        if self.provider == "openai":
            meta = {"cso_stage": self.stage, "cso_run_id": self.run_id[:500]}
            batch_id = asyncio.run(self.client.submit(items, metadata=meta))  # type: ignore[attr-defined]
        else:
            batch_id = asyncio.run(self.client.submit(items))  # type: ignore[attr-defined]
        row = {"batch_id": batch_id, "provider": self.provider, "model": self.mc.model, "stage": self.stage,
               "role": self.role.role, "run_id": self.run_id, "request_hashes": [h for h, _ in items],
               "n_requests": len(items), "status": "submitted", "collected": False, "n_ok": None, "n_error": None,
               "n_resubmit": None, "submitted_at": _now(), "finished_at": None}
        _record_submission(self.spark, self.cfg, row)
        self.stats["batches_submitted"] += 1
        self.stats["batch_requests"] += len(items)
        log.info("stage %s: submitted %s batch %s with %d requests", self.stage, self.provider, batch_id, len(items))
        return row

    def _collect(self, row: dict[str, Any], outcome: BatchOutcome | LLMBatchError) -> dict[str, Any]:
        """Journal a finished batch's results (ledger rows at the batch price); its row, updated."""
        if isinstance(outcome, LLMBatchError):  # rejected as a whole (OpenAI `failed`): every request goes back
            status, results, resubmit = "failed", {}, list(row["request_hashes"])
            log.warning("stage %s: batch %s failed: %s", self.stage, row["batch_id"], outcome)
        else:
            status, results, resubmit = outcome.status, outcome.results, outcome.resubmit
        wanted = set(row["request_hashes"])
        n_ok = n_error = 0
        for cid, result in results.items():
            if cid not in wanted:
                continue
            result.request_hash, result.provider, result.model, result.batch = cid, self.provider, self.mc.model, True
            self.journal.append(ledger_row(result, self.stage, self.role.role, self.run_id, self.cfg.prices))
            n_ok += result.ok
            n_error += not result.ok
        self.stats["batch_ok"] += n_ok
        self.stats["batch_errors"] += n_error
        return {**row, "status": status, "collected": True, "n_ok": n_ok, "n_error": n_error,
                "n_resubmit": len(set(resubmit) & wanted), "finished_at": _now()}

    async def _poll_all(self, rows: list[dict[str, Any]], deadline: float) -> list[dict[str, Any]]:
        pending = {r["batch_id"]: r for r in rows}
        done: list[dict[str, Any]] = []
        seen: dict[str, str] = {}
        async with self.client:
            while pending:
                for batch_id in sorted(pending):
                    async for attempt in _retrying():
                        with attempt:
                            st = await self.client.status(batch_id)  # type: ignore[attr-defined]
                    if seen.get(batch_id) != st.status:
                        seen[batch_id] = st.status
                        log.info("stage %s: batch %s %s %s", self.stage, batch_id, st.status, st.counts)
                    if not st.done:
                        continue
                    try:
                        async for attempt in _retrying():
                            with attempt:
                                outcome: BatchOutcome | LLMBatchError = await self.client.results(batch_id)  # type: ignore[attr-defined]
                    except LLMBatchError as e:
                        outcome = e
                    done.append(self._collect(pending.pop(batch_id), outcome))
                if pending:
                    if time.monotonic() + self.mc.batch_poll_s > deadline:
                        self._finish(done)
                        raise StageError(
                            f"stage {self.stage!r}: batches {sorted(pending)!r} still running after "
                            f"{self.role.role}.batch_wait_s={self.mc.batch_wait_s}; their ids are in llm_batches: "
                            f"rerun the stage (same run id) to resume polling them")
                    await asyncio.sleep(self.mc.batch_poll_s)
        return done

    def _finish(self, done: list[dict[str, Any]]) -> None:
        """Fold collected results into the ledger, then mark their batches collected."""
        self.journal.close()
        flush_journal(self.spark, self.cfg)
        if done:
            merge(self.spark, self.cfg, "llm_batches", self.spark.createDataFrame(done, LLM_BATCHES), update=True)

    def wait(self, rows: list[dict[str, Any]], deadline: float) -> None:
        if not rows:
            return
        done = asyncio.run(self._poll_all(rows, deadline))
        self._finish(done)

    def give_up(self, hashes: Iterable[tuple[str, ChatRequest]], submitted: int) -> None:
        """Record requests the batches could not answer after every resubmission as ledger errors."""
        n = 0
        for h, req in hashes:
            if h in self.given_up:
                continue
            self.given_up.add(h)
            result = ChatResult(status="error", batch=True, attempts=submitted, request_hash=h, provider=self.provider,
                                model=req.model, error=f"no answer after {submitted} batch submissions "
                                "(expired, cancelled or failed on the provider's side)")
            self.journal.append(ledger_row(result, self.stage, self.role.role, self.run_id, self.cfg.prices))
            n += 1
        self.stats["batch_given_up"] += n


def run_batches(spark: SparkSession, cfg: Config, *, stage: str, run_id: str, role: LLMRole,
                plan: Callable[[], DataFrame]) -> dict[str, int]:
    """Answer, through the batch API, every request `plan()` says the stage would send (see the module doc).

    `plan()` returns a PLANNED DataFrame built after the ledger join (the stage's executors, deferring).
    Returns counts for the stage's `runs` row.
    """
    runner = BatchRunner(spark, cfg, stage, run_id, role)
    deadline = time.monotonic() + role.mc.batch_wait_s
    fold_batch_journal(spark, cfg)
    resumed = runner.open_batches()
    runner.stats["batches_resumed"] = len(resumed)
    runner.wait(resumed, deadline)  # a stopped job's batches: poll them, never submit them again
    max_rounds = (role.mc.parse_retries + 1) * (role.mc.batch_resubmits + 1) + 1
    for _ in range(max_rounds):
        flush_journal(spark, cfg)
        counts, refused = runner.submissions(), runner.refused()
        seen: set[str] = set(refused)
        chunk: list[tuple[str, ChatRequest]] = []
        given_up: list[tuple[str, ChatRequest]] = []
        rows: list[dict[str, Any]] = []
        for r in plan().toLocalIterator():
            h = r["request_hash"]
            if h in seen:
                continue
            seen.add(h)
            req = ChatRequest(**json.loads(r["request_json"]))
            if req.hash(runner.provider) != h:
                raise StageError(f"stage {stage!r}: planned request {h} does not hash back to itself (a bug)")
            if counts.get(h, 0) > role.mc.batch_resubmits:
                given_up.append((h, req))
                continue
            runner.stats["batch_resubmitted"] += counts.get(h, 0) > 0
            chunk.append((h, req))
            if len(chunk) >= role.mc.batch_max_requests:
                rows.append(runner.submit(chunk))
                chunk = []
        if chunk:
            rows.append(runner.submit(chunk))
        runner.give_up(given_up, role.mc.batch_resubmits + 1)
        if not rows:
            runner._finish([])
            break
        runner.wait(rows, deadline)
    else:
        raise StageError(f"stage {stage!r}: batch mode did not settle after {max_rounds} rounds (a bug)")
    return runner.stats
