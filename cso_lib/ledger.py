"""The request ledger `llm_calls`: every model request once, which also makes it the cache.

Durability within seconds: executors append each response to a journal file (one JSON line, flushed and
fsynced) the moment it arrives, not when their Spark task ends. The driver folds journal files into the
Delta table (`flush_journal`) before and after every model stage, so a crash (even kill -9) loses only the
requests in flight. Before dispatch, a stage joins the hashes of its requests with the ledger
(`answered`): a rerun sends only what is missing.

The journal folder must be a filesystem path every executor can write (local for local runs, a shared
mount such as NFS on a cluster); object stores have no append.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_io import merge, read_table
from cso_lib.llm import ChatResult, cost_usd
from schemas.tables import LLM_CALLS

# In the journal, timestamps travel as ISO text; everything else has the table's type.
JOURNAL = StructType([StructField(f.name, StringType() if f.name == "created_at" else f.dataType, True)
                      for f in LLM_CALLS.fields])


def ledger_row(result: ChatResult, stage: str, role: str, run_id: str, prices: dict) -> dict[str, Any]:
    """One `llm_calls` row for a result; cost from the price table (None when the model has no price)."""
    rec = result.to_record()
    try:
        cost = cost_usd(result.model or "", result.usage, prices, batch=result.batch) if prices else None
    except Exception:  # noqa: BLE001 - a model missing from the table is priced as unknown, never guessed
        cost = None
    return {
        "request_hash": rec["request_hash"],
        "provider": rec["provider"] or "",
        "model": rec["model"] or "",
        "stage": stage,
        "role": role,
        "status": rec["status"],
        "choices": rec["choices_json"],
        "finish_reasons": json.dumps(rec["finish_reasons"]),
        "input_tokens": rec["input_tokens"],
        "cached_input_tokens": rec["cached_input_tokens"],
        "cache_write_tokens": rec["cache_write_tokens"],
        "output_tokens": rec["output_tokens"],
        "cost_usd": cost,
        "latency_s": float(rec["latency_s"]),
        "attempts": rec["attempts"],
        "http_statuses": json.dumps(rec["http_statuses"]),
        "error": rec["error"],
        "batch": bool(rec["batch"]),
        "run_id": run_id,
        "created_at": datetime.now(UTC).replace(tzinfo=None).isoformat(),
    }


def result_from_row(row: dict[str, Any]) -> ChatResult:
    """A ledger row back as the ChatResult a role parses (a cache hit)."""
    row = {f.name: row.get(f.name) for f in LLM_CALLS.fields}  # to_json drops null fields
    return ChatResult.from_record(
        {
            **row,
            "choices_json": row["choices"],
            "finish_reasons": json.loads(row["finish_reasons"] or "[]"),
            "http_statuses": json.loads(row["http_statuses"] or "[]"),
            "raw": None,
        }
    )


class Journal:
    """Append-only JSONL of ledger rows; each line is on disk before `append` returns."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self._file = None

    def append(self, row: dict[str, Any]) -> None:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.folder / f"{os.getpid()}-{uuid.uuid4().hex}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def extend(self, rows: list[dict[str, Any]]) -> None:
        """Append many rows with one fsync (for rows that cost nothing to redo: the simulation's)."""
        if not rows:
            return
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.folder / f"{os.getpid()}-{uuid.uuid4().hex}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def flush_journal(spark: SparkSession, cfg: Config) -> int:
    """Fold journal files into `llm_calls` (an ok answer replaces an earlier error), then delete them."""
    folder = Path(cfg.journal_path)
    files = sorted(str(p) for p in folder.glob("*.jsonl") if p.stat().st_size) if folder.is_dir() else []
    if not files:
        return 0
    rows = spark.read.schema(JOURNAL).json(files).withColumn("created_at", F.to_timestamp("created_at"))
    # One row per hash from the journal itself: an ok answer wins over errors of the same request.
    best = rows.orderBy(F.col("status") != "ok").dropDuplicates(["request_hash"]).persist()
    n = best.count()
    merge(spark, cfg, "llm_calls", best, update=True, update_condition="t.status != 'ok' AND s.status = 'ok'")
    best.unpersist()
    for f in files:
        Path(f).unlink(missing_ok=True)
    return n


def answered(spark: SparkSession, cfg: Config) -> DataFrame:
    """Ledger rows with an ok answer: what a rerun must not send again."""
    return read_table(spark, cfg, "llm_calls").where(F.col("status") == "ok")
