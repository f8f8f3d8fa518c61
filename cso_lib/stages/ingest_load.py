"""The ingest stage's staging rows and their load into `trajectories`, `steps` and `quarantine`.

Staging is flat, one row per trajectory, per step and per quarantined record, told apart by `kind`:

- `t`: an accepted record: source, locator, ordinal and the `trajectories` columns;
- `s`: one of its steps: trajectory_id and the `steps` columns;
- `q`: a malformed record: source, locator, ordinal, record_id, reason and the first 4 KiB of raw text.

`rec` numbers the records of one batch (task partition << 32 | index in the task), so steps follow their own
record even when two records share a trajectory id. Flat rows cost far less than nested `array<struct>`
rows to move from Python to the JVM, to cache and to write, and each table reads only its own rows.

`load` runs on the staging DataFrame persisted once (the Python pass runs once):
1. one aggregation counts the kinds, the steps and the distinct trajectory ids;
2. verdicts per `t` row: new / present / duplicate (of an earlier row of this batch) / conflict (with the
   table). When no id occurs twice in the batch and none is in `trajectories` (the first ingest: the table
   has no data files in its Delta metadata; or new logs: one semi-join), every row is new and the verdict
   pass (a window, a join, a semi-join per table) is skipped;
3. quarantine is MERGEd (when not empty), then steps, then trajectories are written with
   delta_io.insert_new (the trajectory row last, so a crash between the two is repaired by the rerun):
   an append of the rows whose keys the table lacks, not blind (it reads the table in its transaction),
   so two concurrent ingests conflict and one retries against the other's rows instead of both appending.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter
from typing import Any

import pyarrow as pa
from delta.tables import DeltaTable
from pyspark import StorageLevel, TaskContext
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import IntegerType, LongType, StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_io import ensure_table, insert_new, merge, now, read_table
from cso_lib.ingest import Trajectory
from schemas.tables import TRAJECTORIES

TRAJECTORY, STEP, QUARANTINED = "t", "s", "q"
BATCH_ROWS = 2048  # records per Arrow batch (about 10x as many step rows)
BATCH_BYTES = 32 * 1024 * 1024

_TRAJECTORY_COLUMNS = [
    f.name for f in TRAJECTORIES.fields if f.name not in ("source", "locator", "ingest_run_id", "ingested_at")
]
_STEP_COLUMNS = ["step_idx", "action", "observations", "action_tool"]

STAGING = StructType(
    [
        StructField("kind", StringType(), nullable=False),  # t | s | q
        StructField("rec", LongType(), nullable=False),  # the record, unique in this batch
        StructField("source", StringType(), nullable=True),
        StructField("locator", StringType(), nullable=True),
        StructField("ordinal", LongType(), nullable=True),  # byte offset, array index or row: orders records
        StructField("record_id", StringType(), nullable=True),
        StructField("reason", StringType(), nullable=True),
        StructField("raw", StringType(), nullable=True),  # first 4 KiB, quarantined rows only
        *[
            StructField(f.name, f.dataType, nullable=True)
            for f in TRAJECTORIES.fields
            if f.name in _TRAJECTORY_COLUMNS
        ],
        StructField("step_idx", IntegerType(), nullable=True),
        StructField("action", StringType(), nullable=True),
        StructField("observations", StringType(), nullable=True),
        StructField("action_tool", StringType(), nullable=True),
    ]
)
_NAMES = STAGING.fieldNames()
_HEAD = ["kind", "rec", "source", "locator", "ordinal"]
_T = [*_HEAD, *_TRAJECTORY_COLUMNS]
_S = ["kind", "rec", "trajectory_id", *_STEP_COLUMNS]
_Q = [*_HEAD, "record_id", "reason", "raw"]
_trajectory_values = attrgetter(*_TRAJECTORY_COLUMNS)


class Staging:
    """Accumulates staging rows column-wise per kind and emits Arrow record batches of the STAGING schema."""

    schema = to_arrow_schema(STAGING)

    def __init__(self) -> None:
        ctx = TaskContext.get()
        self.next_rec = (ctx.partitionId() if ctx is not None else 0) << 32
        self.reset()

    def reset(self) -> None:
        self.t: tuple[list[Any], ...] = tuple([] for _ in _T)
        self.s: tuple[list[Any], ...] = tuple([] for _ in _S)
        self.q: tuple[list[Any], ...] = tuple([] for _ in _Q)
        self.n = 0
        self.nbytes = 0

    def _rec(self) -> int:
        self.next_rec += 1
        self.n += 1
        return self.next_rec - 1

    def ok(self, source: str, locator: str, ordinal: int, t: Trajectory, size: int) -> None:
        rec = self._rec()
        for values, value in zip(
            self.t, (TRAJECTORY, rec, source, locator, ordinal, *_trajectory_values(t)), strict=True
        ):
            values.append(value)
        kind, recs, tid, idx, actions, observations, tools = self.s
        n = len(t.steps)
        kind.extend([STEP] * n)
        recs.extend([rec] * n)
        tid.extend([t.trajectory_id] * n)
        idx.extend(range(n))
        for step in t.steps:
            actions.append(step.action)
            observations.append(step.observations)
            tools.append(step.action_tool)
        self.nbytes += size

    def bad(self, source: str, locator: str, ordinal: int, reason: str, raw: str, rid: str | None) -> None:
        for values, value in zip(
            self.q, (QUARANTINED, self._rec(), source, locator, ordinal, rid, reason, raw), strict=True
        ):
            values.append(value)
        self.nbytes += len(raw)

    def __len__(self) -> int:
        return self.n

    @property
    def full(self) -> bool:
        return self.n >= BATCH_ROWS or self.nbytes >= BATCH_BYTES

    def _batch(self, names: list[str], columns: Iterable[list[Any]]) -> pa.RecordBatch | None:
        given = dict(zip(names, columns, strict=True))
        n = len(given["kind"])
        if not n:
            return None
        arrays = [
            pa.array(given[name], type=self.schema.field(name).type)
            if name in given
            else pa.nulls(n, self.schema.field(name).type)
            for name in _NAMES
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def flush(self) -> pa.RecordBatch:
        batches = [self._batch(names, cols) for names, cols in ((_T, self.t), (_S, self.s), (_Q, self.q))]
        self.reset()
        batches = [b for b in batches if b is not None]
        if len(batches) == 1:
            return batches[0]
        return pa.Table.from_batches(batches, schema=self.schema).combine_chunks().to_batches()[0]


def _verdicts(spark: SparkSession, cfg: Config, trajectories: DataFrame) -> DataFrame:
    """Per `t` row: new | present | duplicate (of an earlier row of this batch) | conflict (with the table)."""
    order = Window.partitionBy("trajectory_id").orderBy("source", "ordinal", "locator")
    first = F.first(F.concat_ws(" ", "source", "locator")).over(
        order.rowsBetween(Window.unboundedPreceding, 0)
    )
    v = (
        trajectories.select("rec", "source", "ordinal", "locator", "trajectory_id", "content_hash", "n_steps")
        .withColumn("rank", F.row_number().over(order))
        .withColumn("first", first)
    )
    existing = read_table(spark, cfg, "trajectories").select(
        "trajectory_id", F.col("content_hash").alias("existing_hash")
    )
    v = v.join(existing, "trajectory_id", "left")
    quoted = F.concat(F.lit("'"), F.col("trajectory_id"), F.lit("'"))
    return v.select(
        "rec",
        "source",
        "locator",
        "trajectory_id",
        "n_steps",
        F.when(F.col("rank") > 1, "duplicate")
        .when(F.col("existing_hash").isNull(), "new")
        .when(F.col("existing_hash") == F.col("content_hash"), "present")
        .otherwise("conflict")
        .alias("verdict"),
        F.when(
            F.col("rank") > 1,
            F.concat(
                F.lit("duplicate trajectory_id "),
                quoted,
                F.lit(" in this batch; first occurrence at "),
                "first",
            ),
        )
        .when(
            F.col("existing_hash") != F.col("content_hash"),
            F.concat(
                F.lit("trajectory_id "),
                quoted,
                F.lit(" already ingested with different content (content_hash "),
                F.col("existing_hash").substr(1, 16),
                F.lit(", this record "),
                F.col("content_hash").substr(1, 16),
                F.lit(")"),
            ),
        )
        .alias("reason"),
    )


def _none_ingested(spark: SparkSession, cfg: Config, trajectories: DataFrame) -> bool:
    """No id of `trajectories` is in the `trajectories` table. An empty table (the first ingest) is told from
    its Delta metadata (no data files), without the semi-join that would scan the batch's ids."""
    path = ensure_table(spark, cfg, "trajectories")
    if DeltaTable.forPath(spark, path).detail().select("numFiles").first()[0] == 0:
        return True
    existing = read_table(spark, cfg, "trajectories").select("trajectory_id")
    return trajectories.join(existing, "trajectory_id", "left_semi").isEmpty()


def load(spark: SparkSession, cfg: Config, run_id: str, staged: DataFrame) -> dict[str, int]:
    """Write the staged rows of one batch; stats (read, accepted, new, already_present, quarantined, ...)."""
    cached = [staged.persist(StorageLevel.MEMORY_AND_DISK)]
    try:
        return _load(spark, cfg, run_id, cached)
    finally:
        for df in cached:
            df.unpersist()


def _load(spark: SparkSession, cfg: Config, run_id: str, cached: list[DataFrame]) -> dict[str, int]:
    staged = cached[0]
    is_t = F.col("kind") == TRAJECTORY
    totals = staged.agg(
        F.count(F.when(is_t, 1)).alias("ok"),
        F.count(F.when(F.col("kind") == QUARANTINED, 1)).alias("malformed"),
        F.count(F.when(F.col("kind") == STEP, 1)).alias("steps"),
        F.count_distinct(F.when(is_t, F.col("trajectory_id"))).alias("ids"),
    ).first()
    ok, malformed = totals["ok"], totals["malformed"]
    trajectories = staged.filter(is_t)
    steps = staged.filter(F.col("kind") == STEP)
    stamp = now()

    if totals["ids"] == ok and _none_ingested(spark, cfg, trajectories):
        # No id twice in the batch nor already in the table (the first ingest): every record is new.
        counts, steps_new, rejected = {"new": ok}, totals["steps"], None
        new, new_steps = trajectories, steps
    else:
        verdicts = _verdicts(spark, cfg, trajectories).persist()  # one snapshot of the table for every use
        cached.append(verdicts)
        rows = (
            verdicts.groupBy("verdict")
            .agg(F.count("*").alias("n"), F.sum("n_steps").alias("steps"))
            .collect()
        )
        counts = {r["verdict"]: r["n"] for r in rows}
        steps_new = sum(r["steps"] for r in rows if r["verdict"] == "new")
        rejected = verdicts.filter(F.col("verdict").isin("duplicate", "conflict")).select(
            "source",
            "locator",
            F.col("trajectory_id").alias("record_id"),
            "reason",
            F.lit(None).cast("string").alias("raw"),
        )
        recs = F.broadcast(verdicts.filter(F.col("verdict") == "new").select("rec"))
        new = trajectories.join(recs, "rec", "left_semi")
        new_steps = steps.join(recs, "rec", "left_semi")

    n_rejected = counts.get("duplicate", 0) + counts.get("conflict", 0)
    if malformed + n_rejected:  # skipped when empty: ~2 s of Delta
        bad = staged.filter(F.col("kind") == QUARANTINED).select(
            "source", "locator", "record_id", "reason", "raw"
        )
        quarantine = bad if rejected is None else bad.unionByName(rejected)
        merge(
            spark,
            cfg,
            "quarantine",
            quarantine.withColumns({"run_id": F.lit(run_id), "quarantined_at": F.lit(stamp)}),
            stable_source=True,
        )
    insert_new(
        spark,
        cfg,
        "steps",
        new_steps.select("trajectory_id", *_STEP_COLUMNS, F.lit(run_id).alias("ingest_run_id")),
    )
    insert_new(
        spark,
        cfg,
        "trajectories",
        new.select(
            *[c for c in TRAJECTORIES.fieldNames() if c not in ("ingest_run_id", "ingested_at")],
            F.lit(run_id).alias("ingest_run_id"),
            F.lit(stamp).alias("ingested_at"),
        ),
    )

    read = ok + malformed
    quarantined = malformed + n_rejected
    return {
        "read": read,
        "accepted": read - quarantined,
        "new": counts.get("new", 0),
        "already_present": counts.get("present", 0),
        "quarantined": quarantined,
        "malformed": malformed,
        "duplicates": counts.get("duplicate", 0),
        "conflicts": counts.get("conflict", 0),
        "steps_new": steps_new,
        "rows_in": read,
        "rows_out": counts.get("new", 0),
    }
