"""The ingest stage's staging files and their load into `trajectories`, `steps` and `quarantine`.

The Python pass (cso_lib.stages.ingest) writes what it finds straight to Parquet staging files with pyarrow,
under `<storage.staging_dir>/<run>/` (default `<warehouse>/_staging`), one file per task and kind:

- `t/`: the accepted records: rec, source, locator, ordinal and the `trajectories` columns;
- `s/`: their steps: rec, trajectory_id and the `steps` columns;
- `q/`: the malformed records: rec, source, locator, ordinal, record_id, reason and the first 4 KiB of raw text.

`rec` numbers the records of one batch (task partition << 32 | index in the task), so steps follow their own
record even when two records share a trajectory id. The tasks return only the names and row counts of the
files they wrote (a task attempt that failed wrote files nobody lists), so the rows never pass through the
JVM's Python row conversion, nor a Spark cache: Spark reads the staging files where it needs them.

`load` then:
1. counts from the file listing (accepted, malformed, steps) and the distinct trajectory ids of `t/`;
2. verdicts per `t` row: new / present / duplicate (of an earlier row of this batch) / conflict (with the
   table). When no id occurs twice in the batch and none is in `trajectories` (the first ingest: the table
   has no data files in its Delta metadata; or new logs: one semi-join), every row is new and the verdict
   pass (a window, a join, a semi-join per table) is skipped;
3. quarantine is MERGEd (when not empty), then steps, then trajectories are written with
   delta_io.insert_new (the trajectory row last, so a crash between the two is repaired by the rerun):
   an append of the rows whose keys the table lacks, not blind (it reads the table in its transaction),
   so two concurrent ingests conflict and one retries against the other's rows instead of both appending.
The staging folder of the run is deleted afterwards, whatever happened (it is rebuilt from the input).
"""

from __future__ import annotations

import uuid
from operator import attrgetter
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from delta.tables import DeltaTable
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import IntegerType, LongType, StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_io import ensure_table, insert_new, merge, now, read_table
from cso_lib.errors import InputError
from cso_lib.ingest import Trajectory
from schemas.tables import TRAJECTORIES

TRAJECTORY, STEP, QUARANTINED = "t", "s", "q"
BATCH_ROWS = 2048  # records per Parquet row group (about 10x as many step rows)
BATCH_BYTES = 32 * 1024 * 1024

_TRAJECTORY_COLUMNS = [
    f.name for f in TRAJECTORIES.fields if f.name not in ("source", "locator", "ingest_run_id", "ingested_at")
]
_STEP_COLUMNS = ["step_idx", "action", "observations", "action_tool"]
_REC = StructField("rec", LongType(), nullable=False)  # the record, unique in this batch
_WHERE = [
    StructField("source", StringType(), nullable=False),
    StructField("locator", StringType(), nullable=False),
    StructField("ordinal", LongType(), nullable=False),  # byte offset, array index or row: orders records
]
STAGED = {
    TRAJECTORY: StructType(
        [_REC, *_WHERE, *[f for f in TRAJECTORIES.fields if f.name in _TRAJECTORY_COLUMNS]]
    ),
    STEP: StructType(
        [
            _REC,
            StructField("trajectory_id", StringType(), nullable=False),
            StructField("step_idx", IntegerType(), nullable=False),
            StructField("action", StringType(), nullable=False),
            StructField("observations", StringType(), nullable=False),
            StructField("action_tool", StringType(), nullable=True),
        ]
    ),
    QUARANTINED: StructType(
        [
            _REC,
            *_WHERE,
            StructField("record_id", StringType(), nullable=True),
            StructField("reason", StringType(), nullable=False),
            StructField("raw", StringType(), nullable=True),  # first 4 KiB of the record
        ]
    ),
}
FILES = StructType(  # what the Python pass returns: one row per staging file it wrote
    [
        StructField("kind", StringType(), nullable=False),  # t | s | q
        StructField("path", StringType(), nullable=False),
        StructField("rows", LongType(), nullable=False),
    ]
)
_ARROW = {kind: to_arrow_schema(schema) for kind, schema in STAGED.items()}
_trajectory_values = attrgetter(*_TRAJECTORY_COLUMNS)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a path or URI, and the path inside it. Hadoop's `s3a://` / `s3n://` are S3.

    >>> type(filesystem("/tmp/x")[0]).__name__, filesystem("/tmp/x")[1]
    ('LocalFileSystem', '/tmp/x')
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    scheme, rest = uri.split("://", 1)
    if scheme in ("s3a", "s3n"):
        uri = f"s3://{rest}"
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise InputError(f"{uri!r}: pyarrow cannot open this filesystem ({e})") from e


class Staging:
    """Accumulates one task's staging rows column-wise per kind and writes them to Parquet files in `directory`
    (`<directory>/<kind>/part-<partition>-<attempt>-<random>.parquet`), a row group per flush."""

    def __init__(self, directory: str) -> None:
        ctx = TaskContext.get()
        part, attempt = (ctx.partitionId(), ctx.attemptNumber()) if ctx is not None else (0, 0)
        self.next_rec = part << 32
        self.directory = directory.rstrip("/")
        self.name = f"part-{part:05d}-{attempt}-{uuid.uuid4().hex[:12]}.parquet"
        self.fs, self.root = filesystem(self.directory)
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.rows = {kind: 0 for kind in STAGED}
        self.reset()

    def reset(self) -> None:
        self.columns: dict[str, tuple[list[Any], ...]] = {
            kind: tuple([] for _ in schema.fields) for kind, schema in STAGED.items()
        }
        self.n = 0
        self.nbytes = 0

    def _rec(self) -> int:
        self.next_rec += 1
        self.n += 1
        return self.next_rec - 1

    def ok(self, source: str, locator: str, ordinal: int, t: Trajectory, size: int) -> None:
        rec = self._rec()
        for values, value in zip(
            self.columns[TRAJECTORY], (rec, source, locator, ordinal, *_trajectory_values(t)), strict=True
        ):
            values.append(value)
        recs, tid, idx, actions, observations, tools = self.columns[STEP]
        n = len(t.steps)
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
            self.columns[QUARANTINED], (self._rec(), source, locator, ordinal, rid, reason, raw), strict=True
        ):
            values.append(value)
        self.nbytes += len(raw)

    @property
    def full(self) -> bool:
        return self.n >= BATCH_ROWS or self.nbytes >= BATCH_BYTES

    def flush(self) -> None:
        """Write the rows held so far (a row group per kind that has rows)."""
        for kind, columns in self.columns.items():
            if not columns[0]:
                continue
            schema = _ARROW[kind]
            batch = pa.RecordBatch.from_arrays(
                [pa.array(values, type=field.type) for values, field in zip(columns, schema, strict=True)],
                schema=schema,
            )
            if kind not in self.writers:
                self.fs.create_dir(f"{self.root}/{kind}", recursive=True)
                self.writers[kind] = pq.ParquetWriter(
                    f"{self.root}/{kind}/{self.name}", schema, filesystem=self.fs, compression="snappy"
                )
            self.writers[kind].write_batch(batch)
            self.rows[kind] += batch.num_rows
        self.reset()

    def close(self) -> pa.RecordBatch:
        """Flush, close the files; one FILES row per file written."""
        self.flush()
        for writer in self.writers.values():
            writer.close()
        kinds = list(self.writers)
        return pa.RecordBatch.from_pydict(
            {
                "kind": kinds,
                "path": [f"{self.directory}/{kind}/{self.name}" for kind in kinds],
                "rows": [self.rows[kind] for kind in kinds],
            },
            schema=to_arrow_schema(FILES),
        )


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


def _staged(spark: SparkSession, files: list[Any], kind: str) -> DataFrame:
    paths = [f["path"] for f in files if f["kind"] == kind]
    if not paths:
        return spark.createDataFrame([], STAGED[kind])
    return spark.read.schema(STAGED[kind]).parquet(*paths)


def load(spark: SparkSession, cfg: Config, run_id: str, files: list[Any]) -> dict[str, int]:
    """Write the staged rows of one batch (`files`: the FILES rows of the Python pass); stats (read, accepted,
    new, already_present, quarantined, ...)."""
    rows = {kind: sum(f["rows"] for f in files if f["kind"] == kind) for kind in STAGED}
    ok, malformed = rows[TRAJECTORY], rows[QUARANTINED]
    trajectories, steps = _staged(spark, files, TRAJECTORY), _staged(spark, files, STEP)
    stamp = now()
    ids = trajectories.select(F.count_distinct("trajectory_id")).first()[0] if ok else 0
    verdicts = None
    try:
        if ids == ok and _none_ingested(spark, cfg, trajectories):
            # No id twice in the batch nor already in the table (the first ingest): every record is new.
            counts, steps_new, rejected = {"new": ok}, rows[STEP], None
            new, new_steps = trajectories, steps
        else:
            verdicts = _verdicts(spark, cfg, trajectories).persist()  # one snapshot of the table for every use
            by_verdict = (
                verdicts.groupBy("verdict")
                .agg(F.count("*").alias("n"), F.sum("n_steps").alias("steps"))
                .collect()
            )
            counts = {r["verdict"]: r["n"] for r in by_verdict}
            steps_new = sum(r["steps"] for r in by_verdict if r["verdict"] == "new")
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
            bad = _staged(spark, files, QUARANTINED).select("source", "locator", "record_id", "reason", "raw")
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
    finally:
        if verdicts is not None:
            verdicts.unpersist()

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
