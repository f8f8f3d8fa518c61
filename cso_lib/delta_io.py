"""Delta table I/O: create with schema, idempotent MERGE on natural keys, run records."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import delta.exceptions.captured  # noqa: F401 - installs the JVM -> Python conversion of Delta's conflicts
from delta.exceptions import (
    ConcurrentAppendException,
    ConcurrentDeleteReadException,
    ConcurrentTransactionException,
    MetadataChangedException,
)
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from cso_lib.config import Config
from cso_lib.delta_commit import append_rows
from schemas.tables import KEYS, TABLES

log = logging.getLogger("cso")

# Delta raises these (as Python exceptions only once delta.exceptions.captured is imported: delta-spark 4.0.1
# never imports it itself, and without it every conflict arrives as a bare Py4JJavaError and is not retried).
CONCURRENT_WRITE_ERRORS = (
    ConcurrentAppendException,
    ConcurrentDeleteReadException,
    ConcurrentTransactionException,
    MetadataChangedException,
)

TABLE_PROPERTIES = {"delta.enableChangeDataFeed": "true"}  # every table
# Per table: data-skipping statistics only on the columns queries filter and join on. `steps` and
# `trajectories` hold long JSON texts (actions, observations, preambles, tool specs) whose min/max are useless
# for skipping and cost a pass over every value at each write.
TABLE_EXTRA_PROPERTIES = {
    "steps": {"delta.dataSkippingStatsColumns": "trajectory_id,step_idx,action_tool,ingest_run_id"},
    "trajectories": {
        "delta.dataSkippingStatsColumns": "trajectory_id,task_id,outcome,reward,policy_model,policy_version,env,"
        "round,n_steps,input_format,ingest_run_id,ingested_at"
    },
}


def table_properties(name: str) -> dict[str, str]:
    """The properties a cso table carries: TABLE_PROPERTIES and its own TABLE_EXTRA_PROPERTIES."""
    return {**TABLE_PROPERTIES, **TABLE_EXTRA_PROPERTIES.get(name, {})}


def table_path(cfg: Config, name: str) -> str:
    return cfg.storage.table(name)


_ENSURED: set[tuple[str, str]] = set()  # (Spark application id, path) created or found in this driver


def ensure_table(spark: SparkSession, cfg: Config, name: str) -> str:
    path = table_path(cfg, name)
    key = (spark.sparkContext.applicationId, path)
    if key in _ENSURED:
        return path
    builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(TABLES[name])
    for prop, value in table_properties(name).items():
        builder = builder.property(prop, value)
    builder.execute()
    _ENSURED.add(key)
    return path


def ensure_tables(spark: SparkSession, cfg: Config, names: Iterable[str] = TABLES) -> None:
    """Create every missing table (of `names`), several at once (each creation is a Delta commit made by the
    driver)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda name: ensure_table(spark, cfg, name), names))


def read_table(spark: SparkSession, cfg: Config, name: str) -> DataFrame:
    return spark.read.format("delta").load(ensure_table(spark, cfg, name))


def _conform(df: DataFrame, name: str) -> DataFrame:
    """Columns in the table's order and types, so a MERGE never evolves a schema by accident."""
    schema = TABLES[name]
    missing = [f.name for f in schema.fields if f.name not in df.columns]
    if missing:
        raise ValueError(f"rows for table {name!r} lack columns {missing!r}")
    return df.select(*[df[f.name].cast(f.dataType).alias(f.name) for f in schema.fields])


@retry(
    retry=retry_if_exception_type(CONCURRENT_WRITE_ERRORS),
    wait=wait_random_exponential(multiplier=0.5, max=10),
    stop=stop_after_attempt(6),
    reraise=True,
)
def merge(
    spark: SparkSession,
    cfg: Config,
    name: str,
    df: DataFrame,
    update: bool = False,
    stable_source: bool = False,
    update_condition: str | None = None,
) -> None:
    """MERGE rows into a table on its natural keys: insert new keys, and update existing ones if `update`
    (only where `update_condition` holds, when given; `t.` is the table, `s.` the new rows).

    Insert-only merges (the default) are what make every stage idempotent: a rerun adds nothing.
    Delta's concurrent-write conflicts are retried with jittered backoff. `stable_source=True` says the
    source reads immutable files (e.g. a staging folder), so Delta need not copy it before merging.
    """
    target = DeltaTable.forPath(spark, ensure_table(spark, cfg, name))
    cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in KEYS[name])
    builder = target.alias("t").merge(_conform(df, name).alias("s"), cond)
    if update:
        builder = builder.whenMatchedUpdateAll(condition=update_condition)
    key = "spark.databricks.delta.merge.materializeSource"
    previous = spark.conf.get(key, "auto")
    if stable_source:
        spark.conf.set(key, "none")
    try:
        builder.whenNotMatchedInsertAll().execute()
    finally:
        spark.conf.set(key, previous)


@retry(
    retry=retry_if_exception_type(CONCURRENT_WRITE_ERRORS),
    wait=wait_random_exponential(multiplier=0.5, max=10),
    stop=stop_after_attempt(6),
    reraise=True,
)
def insert_new(spark: SparkSession, cfg: Config, name: str, df: DataFrame) -> None:
    """Append the rows whose keys the table lacks: an insert-only MERGE, written as an append of
    `rows LEFT ANTI JOIN table` (cheaper: no MERGE machinery, and into an empty table the join is a broadcast
    of nothing).

    Not blind: the source reads the target inside the write's transaction, so Delta records that this commit
    read the whole table (history: isBlindAppend = false). A concurrent commit that adds rows to the table
    then makes this one fail with ConcurrentAppendException, and the retry joins against those rows; and a
    concurrent MERGE or insert_new sees this commit's rows as a conflict in turn. (A plain append is blind,
    and under Delta's default WriteSerializable isolation nobody conflicts with a blind append: two first
    ingests of the same files would both commit every row.) Retried like `merge`.
    """
    path = ensure_table(spark, cfg, name)
    keys = KEYS[name]
    existing = spark.read.format("delta").load(path).select(*keys)
    _conform(df, name).join(existing, keys, "left_anti").write.format("delta").mode("append").save(path)


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@contextmanager
def stage_run(spark: SparkSession, cfg: Config, run_id: str, stage: str) -> Iterator[dict]:
    """Names the stage in the Spark UI (job group and description of every Spark job it starts), logs its
    start, end or failure with run id, counts and duration, and records them in `runs` when it succeeds."""
    started = now()
    t0 = time.monotonic()
    stats: dict = {}
    sc = spark.sparkContext
    props = ("spark.jobGroup.id", "spark.job.description")
    previous = [sc.getLocalProperty(k) for k in props]
    sc.setJobGroup(f"cso-{stage}", f"cso {stage} run={run_id}")
    sc.setJobDescription(f"cso {stage} ({run_id})")
    log.info("stage=%s run_id=%s started", stage, run_id)
    try:
        yield stats
    except BaseException as e:
        log.error("stage=%s run_id=%s failed after %.1f s: %s: %s", stage, run_id, time.monotonic() - t0,
                  type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        raise
    finally:
        for key, value in zip(props, previous, strict=True):
            sc.setLocalProperty(key, value)
    record_run(spark, cfg, run_id, stage, started, time.monotonic() - t0, stats)


def record_run(spark: SparkSession, cfg: Config, run_id: str, stage: str, started: datetime, seconds: float,
               stats: dict) -> None:
    """Log one finished stage (run id, stage, rows in / out, seconds, details) and append it to `runs`."""
    details = json.dumps(stats, default=str, sort_keys=True)
    log.info("stage=%s run_id=%s rows_in=%s rows_out=%s seconds=%.1f details=%s", stage, run_id,
             stats.get("rows_in"), stats.get("rows_out"), seconds, details)
    row = [(run_id, stage, started, now(), seconds, stats.get("rows_in"), stats.get("rows_out"), details)]
    path = ensure_table(spark, cfg, "runs")
    if not append_rows(spark, path, TABLES["runs"], row):  # pyarrow file + direct commit, else Spark
        spark.createDataFrame(row, TABLES["runs"]).write.format("delta").mode("append").save(path)


def new_run_id(kind: str = "run") -> str:
    """A sortable, unique run id, e.g. run-20261123T050102-3fa2c1."""
    import secrets

    return f"{kind}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
