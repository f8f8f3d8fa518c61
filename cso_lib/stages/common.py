"""What the mining stages share: the run being worked on, trajectory bundles, Arrow batch functions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_io import read_table
from cso_lib.errors import StageError
from cso_lib.messages import Message, Step, iter_states

BATCH_ROWS = 256  # trajectories per Arrow batch handed to a model call


def resolve_run_id(spark: SparkSession, cfg: Config) -> str:
    """cfg.run_id, or the most recently selected run."""
    if cfg.run_id:
        return cfg.run_id
    latest = read_table(spark, cfg, "work_set").orderBy(F.col("selected_at").desc()).select("run_id").first()
    if latest is None:
        raise StageError("no run selected yet: run the `select` stage first (or pass run_id)")
    return latest["run_id"]


def work_trajectories(spark: SparkSession, cfg: Config, run_id: str) -> DataFrame:
    ws = read_table(spark, cfg, "work_set").where(F.col("run_id") == run_id).select("trajectory_id")
    return read_table(spark, cfg, "trajectories").join(ws, "trajectory_id", "left_semi")


def work_steps(spark: SparkSession, cfg: Config, run_id: str) -> DataFrame:
    ws = read_table(spark, cfg, "work_set").where(F.col("run_id") == run_id).select("trajectory_id")
    return read_table(spark, cfg, "steps").join(ws, "trajectory_id", "left_semi")


def bundles(
    spark: SparkSession, cfg: Config, run_id: str, todo: DataFrame, extra: DataFrame | None = None
) -> DataFrame:
    """One row per work-set trajectory that has rows in `todo` (keyed by trajectory_id).

    Columns: trajectory fields, `steps_json` (the trajectory's steps in order, as one JSON array) and
    `todo_json` (the todo rows of that trajectory). The per-step prompts are built from these inside the
    executors, one trajectory at a time, so no table ever holds a per-step copy of the prefix.
    """
    todo_cols = [c for c in todo.columns if c != "trajectory_id"]
    todo_g = todo.groupBy("trajectory_id").agg(
        F.to_json(F.collect_list(F.struct(*todo_cols))).alias("todo_json")
    )
    steps = steps_json(spark, cfg, todo_g)
    traj = work_trajectories(spark, cfg, run_id).select(
        "trajectory_id", "task_id", "env", "ground_truth", "tools", "preamble", "policy_version", "round",
        "n_steps")
    n = max(1, cfg.spark.shuffle_partitions)
    out = traj.join(steps, "trajectory_id").join(todo_g, "trajectory_id")
    if extra is not None:
        out = out.join(extra, "trajectory_id", "left")
    return out.repartition(n, "trajectory_id")


def steps_json(spark: SparkSession, cfg: Config, trajectories: DataFrame) -> DataFrame:
    """(trajectory_id, steps_json): the steps of the given trajectories in order, as one JSON array each."""
    return (
        read_table(spark, cfg, "steps")
        .join(trajectories.select("trajectory_id"), "trajectory_id", "left_semi")
        .groupBy("trajectory_id")
        .agg(F.to_json(F.array_sort(F.collect_list(F.struct("step_idx", "action", "observations")))).alias(
            "steps_json"))
    )


def parse_bundle(row: dict[str, Any]) -> tuple[list[Message], list[Step], list[dict] | None, list[dict]]:
    """(preamble, steps, tools, todo rows) of a bundle row."""
    steps = [(orjson.loads(s["action"]), orjson.loads(s["observations"])) for s in orjson.loads(row["steps_json"])]
    tools = orjson.loads(row["tools"]) if row.get("tools") else None
    return orjson.loads(row["preamble"]), steps, tools, orjson.loads(row["todo_json"])


def map_batches(
    df: DataFrame, fn: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], schema: StructType, profile=None
) -> DataFrame:
    """Apply `fn` (rows of one Arrow batch -> output rows) on executors with mapInArrow; `profile` (a Spark
    ResourceProfile) runs it with stage-level scheduling, e.g. on GPU executors."""
    arrow_schema = to_arrow_schema(schema)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        pending: list[dict[str, Any]] = []
        for batch in batches:
            pending.extend(batch.to_pylist())
            while len(pending) >= BATCH_ROWS:
                chunk, pending = pending[:BATCH_ROWS], pending[BATCH_ROWS:]
                yield pa.RecordBatch.from_pylist(fn(chunk), schema=arrow_schema)
        if pending:
            yield pa.RecordBatch.from_pylist(fn(pending), schema=arrow_schema)

    return df.mapInArrow(run, schema, profile=profile)


def materialize(df: DataFrame) -> DataFrame:
    """Compute `df` once, now, and cut its lineage: rows that came from model calls are never recomputed by a
    later action (a persisted DataFrame can be, e.g. when Delta's MERGE re-plans its source), so no request is
    sent twice. A lost executor fails the stage instead; the rerun resumes from the ledger and the tables."""
    return df.localCheckpoint(eager=True)


def nothing_to_do(spark: SparkSession, cfg: Config, stats: dict) -> None:
    """Record a stage that found no work (a rerun, or a resumed run whose rows are all stored): no bundles, no
    model pass, no MERGE. Journal rows a killed run left behind are still folded into the ledger."""
    from cso_lib.ledger import flush_journal

    stats["rows_out"] = 0
    stats["nothing_to_do"] = True
    stats["ledger_rows"] = flush_journal(spark, cfg)


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


HASHES = StructType([StructField("trajectory_id", StringType(), False), StructField("request_hash", StringType(), False)])


def ledger_cache(spark: SparkSession, cfg: Config, bundled: DataFrame,
                 hash_rows: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> DataFrame:
    """The ledger join before dispatch: per trajectory, the `llm_calls` rows already answering its requests.

    `hash_rows` builds a batch's requests exactly as the stage will and returns (trajectory_id,
    request_hash) rows; nothing is sent. The result (trajectory_id, cached_json) goes to `bundles(extra=)`.
    """
    from cso_lib.ledger import answered

    hashes = map_batches(bundled, hash_rows, HASHES)
    hits = hashes.join(answered(spark, cfg).drop("run_id", "created_at"), "request_hash")
    cols = [c for c in hits.columns if c != "trajectory_id"]
    return hits.groupBy("trajectory_id").agg(F.to_json(F.collect_list(F.struct(*cols))).alias("cached_json"))


def ledger_context(cfg_json: str, stage: str, run_id: str, rows: list[dict[str, Any]], defer: bool = False):
    """The LedgerContext of one batch: its cached answers (from `ledger_cache`) and a journal.

    `defer=True` (batch mode, `cso_lib.batch_mode`): cache misses are collected, never sent."""
    from cso_lib.ledger import Journal
    from cso_lib.llm_models import LedgerContext
    from cso_lib.models import get_config

    cfg = get_config(cfg_json)
    cached = {}
    for row in rows:
        for rec in orjson.loads(row.get("cached_json") or "[]"):
            cached[rec["request_hash"]] = rec
    return LedgerContext(stage=stage, run_id=run_id, cached=cached, journal=Journal(cfg.journal_path),
                         prices=cfg.prices, defer=defer)


def todo_states(rows: list[dict[str, Any]]) -> Iterator[tuple[dict, int, list[Message], list[Step], Any, dict]]:
    """(row, t, state, steps, tools, item) for each todo item of a batch of bundles: trajectory by trajectory,
    steps in order, a step's items by alt_idx, so requests sharing a prompt prefix go out back to back."""
    for row in rows:
        preamble, steps, tools, todo = parse_bundle(row)
        by_step: dict[int, list[dict]] = {}
        for item in todo:
            by_step.setdefault(item["step_idx"], []).append(item)
        for t, state in iter_states(preamble, steps):
            for item in sorted(by_step.get(t, []), key=lambda i: i.get("alt_idx", 0)):
                yield row, t, state, steps, tools, item


def hash_rows_of(requests: list, hashes: list[list[str]]) -> list[dict[str, Any]]:
    """(trajectory_id, request_hash) rows for `ledger_cache`, from a role's `all_hashes(requests)`."""
    return [{"trajectory_id": r.trajectory_id, "request_hash": h}
            for r, hs in zip(requests, hashes, strict=True) for h in hs]


@contextmanager
def role_ledger(cfg_json: str, stage: str, run_id: str, rows: list[dict[str, Any]], role, defer: bool | None = None):
    """The ledger context of one batch for `role` (None when the role records no calls), its journal closed at
    the end. A role in batch mode (or `defer=True`) sends nothing: its answers come from the ledger."""
    if not role.records_calls and not defer:
        yield None
        return
    if defer is None:
        defer = bool(getattr(getattr(role, "mc", None), "batch", False))
    ctx = ledger_context(cfg_json, stage, run_id, rows, defer=defer)
    try:
        yield ctx
    finally:
        if ctx.journal is not None:
            ctx.journal.close()


def ledger_bundles(spark: SparkSession, cfg: Config, run_id: str, todo: DataFrame, role, stage: str, stats: dict,
                   hash_rows: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
                   plan_rows: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> DataFrame:
    """The stage's bundles, with the ledger's answers joined in for a provider-backed role (the join before
    dispatch). First the answers a crashed run already paid for are folded in; in batch mode the missing
    requests (`plan_rows`, nothing sent) go out as provider batches from the driver and land in the ledger."""
    from cso_lib.batch_mode import PLANNED, run_batches
    from cso_lib.ledger import flush_journal
    from cso_lib.llm_models import LLMRole

    bundled = bundles(spark, cfg, run_id, todo)
    if not isinstance(role, LLMRole):
        return bundled

    def joined() -> DataFrame:
        return bundles(spark, cfg, run_id, todo, extra=ledger_cache(spark, cfg, bundled, hash_rows))

    stats["ledger_rows_recovered"] = flush_journal(spark, cfg)
    if role.mc.batch:
        stats.update(run_batches(spark, cfg, stage=stage, run_id=run_id, role=role,
                                 plan=lambda: map_batches(joined(), plan_rows, PLANNED)))
    return joined()


def write_round_parquet(df: DataFrame, path: str, order: list[str]) -> int:
    """Write `df` as one sorted Parquet file per `round` partition (only the rounds present are replaced); its
    row count."""
    df = df.persist()
    n = df.count()
    (df.orderBy(*order).coalesce(1).write.mode("overwrite").option("partitionOverwriteMode", "dynamic")
     .partitionBy("round").parquet(path))
    df.unpersist()
    return n
