"""The ingest stage's files and their load into `trajectories`, `steps` and `quarantine`.

The Python pass (cso_lib.stages.ingest) writes what it finds straight to Parquet with pyarrow, one file per
task and kind, and returns only their names, sizes, row counts and Delta statistics (FILES rows):

- `t`: the accepted records as `trajectories` rows and `s`: their steps as `steps` rows, written **into the
  tables' folders** (uncommitted until the load commits them), or into the staging folder when a
  table's layout or this Delta does not allow it (plan_writes);
- `i`: an index of the accepted records (rec, source, locator, ordinal, trajectory id, content hash, their row
  in the `t` file, their number of `s` rows, the task's file group), in `<storage.staging_dir>/<run>/i/`;
- `q`: the malformed records (rec, source, locator, ordinal, record_id, reason, first 4 KiB of raw text), in
  `<storage.staging_dir>/<run>/q/`.

`rec` numbers the records of one batch (task partition << 32 | index in the task). A task attempt that failed
wrote files nobody lists. Nothing passes through the JVM's Python row conversion or a Spark cache.

`load` then, for `trajectories` and `steps` each in one Delta transaction that starts before its checks
(cso_lib.delta_commit.DirectAppend: the table as of that snapshot; the commit read the whole table, so a
concurrent commit that adds files makes it fail, and the table is then written as before, below):
1. counts from the file listing (accepted, malformed, steps) and the distinct trajectory ids of the index;
2. verdicts per accepted record: new / present / duplicate (of an earlier record of this batch) / conflict
   (with the table). When no id occurs twice in the batch and none is in `trajectories` (an empty table: the
   snapshot has no files; or new logs: one semi-join), every record is new and the verdict pass (a window, a
   join) is skipped. A step is new when its record is, unless `steps` already holds its trajectory (a run killed
   between the two commits);
3. quarantine is MERGEd (when not empty); then, per task, files whose rows are all new are committed as they
   are, files with none are deleted, and the others are rewritten with only their new rows (pyarrow, grouped by
   task) before the commit: `steps` first, then `trajectories` (the trajectory row last, so a crash between
   the two is repaired by the rerun). The append is not blind, as with delta_io.insert_new.
If a commit meets a concurrent one (or the files were staged), the files' rows are written with
delta_io.insert_new instead (an append of the rows whose keys the table lacks, in a transaction that reads the
table; retried). Files written but not committed are deleted at the end, and the staging folder of the run
(rebuilt from the input), whatever happened; a killed run leaves uncommitted files in the tables' folders,
which no reader sees and VACUUM (`cso housekeeping`) removes.
"""

from __future__ import annotations

import logging
import uuid
from functools import partial
from operator import attrgetter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark import TaskContext
from pyspark.sql import DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import IntegerType, LongType, StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_commit import (
    DataFile,
    DirectAppend,
    FileStats,
    LatestTable,
    api_problem,
    filesystem,
    require_values,
    snapshot,
    write_parquet,
)
from cso_lib.delta_io import CONCURRENT_WRITE_ERRORS, ensure_table, insert_new, merge, now
from cso_lib.ingest import Trajectory
from schemas.tables import STEPS, TRAJECTORIES

log = logging.getLogger("cso")

TRAJECTORY, STEP, INDEX, QUARANTINED = "t", "s", "i", "q"
TABLE_OF = {TRAJECTORY: "trajectories", STEP: "steps"}
BATCH_ROWS = 2048  # records per Parquet row group (about 10x as many step rows)
BATCH_BYTES = 32 * 1024 * 1024

_REC = StructField("rec", LongType(), nullable=False)  # the record, unique in this batch
_WHERE = [
    StructField("source", StringType(), nullable=False),
    StructField("locator", StringType(), nullable=False),
    StructField("ordinal", LongType(), nullable=False),  # byte offset, array index or row: orders records
]
FILE_SCHEMAS = {
    TRAJECTORY: TRAJECTORIES,
    STEP: STEPS,
    INDEX: StructType(
        [
            _REC,
            *_WHERE,
            StructField("trajectory_id", StringType(), nullable=False),
            StructField("content_hash", StringType(), nullable=False),
            StructField("pos", LongType(), nullable=False),  # its row in the task's `t` file
            StructField("s_rows", IntegerType(), nullable=False),  # its rows in the task's `s` file, in order
            StructField("group", StringType(), nullable=False),  # the task's files
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
FILES = StructType(  # what the Python pass returns: one row per file it wrote
    [
        StructField("kind", StringType(), nullable=False),  # t | s | i | q
        StructField("path", StringType(), nullable=False),
        StructField("rows", LongType(), nullable=False),
        StructField("bytes", LongType(), nullable=False),
        StructField("stats", StringType(), nullable=True),  # Delta statistics JSON (t and s)
        StructField("group", StringType(), nullable=False),  # the task's file group
    ]
)
_ARROW = {kind: to_arrow_schema(schema) for kind, schema in FILE_SCHEMAS.items()}
_CONSTANT = ("ingest_run_id", "ingested_at")  # filled per batch, not per row
# Per record, the `trajectories` columns in table order, but source, locator and the constants.
_T_HEAD = [f.name for f in TRAJECTORIES.fields][: TRAJECTORIES.fieldNames().index("source")]
_trajectory_head = attrgetter(*_T_HEAD)
assert TRAJECTORIES.fieldNames()[len(_T_HEAD):] == ["source", "locator", "metadata", *_CONSTANT]
assert STEPS.fieldNames() == ["trajectory_id", "step_idx", "action", "observations", "action_tool", "ingest_run_id"]


class Staging:
    """Accumulates one task's rows column-wise per kind and writes them to Parquet, a row group per flush: `t`
    and `s` as `trajectories` and `steps` rows into `dirs[t]` and `dirs[s]` (the tables' folders, or staging
    folders), `i` and `q` under `staging`. Every file of the task is named `<group>-c000.snappy.parquet`,
    group = `part-<partition>-<attempt>-<random>`."""

    def __init__(
        self, staging: str, dirs: dict[str, str], run_id: str, stamp: Any, stats_columns: dict[str, list[str]]
    ) -> None:
        ctx = TaskContext.get()
        part, attempt = (ctx.partitionId(), ctx.attemptNumber()) if ctx is not None else (0, 0)
        self.next_rec = part << 32
        self.group = f"part-{part:05d}-{attempt}-{uuid.uuid4().hex[:12]}"
        folders = {**dirs, INDEX: f"{staging.rstrip('/')}/{INDEX}", QUARANTINED: f"{staging.rstrip('/')}/{QUARANTINED}"}
        self.paths = {kind: f"{folder.rstrip('/')}/{self.group}-c000.snappy.parquet" for kind, folder in folders.items()}
        self.run_id, self.stamp = run_id, stamp
        self.stats = {kind: FileStats(_ARROW[kind], stats_columns.get(kind, [])) for kind in (TRAJECTORY, STEP)}
        self.writers: dict[str, tuple[pq.ParquetWriter, pafs.FileSystem, str]] = {}
        self.rows = dict.fromkeys(FILE_SCHEMAS, 0)
        self.pos = 0
        self.reset()

    def reset(self) -> None:
        width = {TRAJECTORY: len(_T_HEAD) + 3, STEP: 5, INDEX: 8, QUARANTINED: 7}
        self.columns: dict[str, tuple[list[Any], ...]] = {
            kind: tuple([] for _ in range(n)) for kind, n in width.items()
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
            self.columns[TRAJECTORY], (*_trajectory_head(t), source, locator, t.metadata), strict=True
        ):
            values.append(value)
        tid, idx, actions, observations, tools = self.columns[STEP]
        n = len(t.steps)
        tid.extend([t.trajectory_id] * n)
        idx.extend(range(n))
        for step in t.steps:
            actions.append(step.action)
            observations.append(step.observations)
            tools.append(step.action_tool)
        for values, value in zip(
            self.columns[INDEX], (rec, source, locator, ordinal, t.trajectory_id, t.content_hash, self.pos, n),
            strict=True,
        ):
            values.append(value)
        self.pos += 1
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

    def _constants(self, kind: str, n: int) -> list[pa.Array]:
        if kind == TRAJECTORY:
            return [pa.array([self.run_id] * n, pa.string()), pa.array([self.stamp] * n, _ARROW[kind].field(_CONSTANT[1]).type)]
        if kind == STEP:
            return [pa.array([self.run_id] * n, pa.string())]
        if kind == INDEX:
            return [pa.array([self.group] * n, pa.string())]
        return []

    def flush(self) -> None:
        """Write the rows held so far (a row group per kind that has rows)."""
        for kind, columns in self.columns.items():
            if not columns[0]:
                continue
            schema = _ARROW[kind]
            n = len(columns[0])
            arrays = [pa.array(values, type=field.type) for values, field in zip(columns, schema, strict=False)]
            batch = pa.RecordBatch.from_arrays([*arrays, *self._constants(kind, n)], schema=schema)
            require_values(batch, f"ingest ({kind!r} rows)")  # the converters never let a null through
            if kind in self.stats:
                self.stats[kind].update(batch)
            if kind not in self.writers:
                fs, path = filesystem(self.paths[kind])
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                self.writers[kind] = (pq.ParquetWriter(path, schema, filesystem=fs, compression="snappy"), fs, path)
            self.writers[kind][0].write_batch(batch)
            self.rows[kind] += n
        self.reset()

    def close(self) -> pa.RecordBatch:
        """Flush, close the files; one FILES row per file written."""
        self.flush()
        out: dict[str, list[Any]] = {name: [] for name in FILES.fieldNames()}
        for kind, (writer, fs, path) in self.writers.items():
            writer.close()
            for name, value in zip(
                FILES.fieldNames(),
                (kind, self.paths[kind], self.rows[kind], fs.get_file_info(path).size,
                 self.stats[kind].json() if kind in self.stats else None, self.group),
                strict=True,
            ):
                out[name].append(value)
        return pa.RecordBatch.from_pydict(out, schema=to_arrow_schema(FILES))


def _verdicts(index: DataFrame, existing: DataFrame) -> DataFrame:
    """Per index row: new | present | duplicate (of an earlier row of this batch) | conflict (with the table)."""
    order = Window.partitionBy("trajectory_id").orderBy("source", "ordinal", "locator")
    first = F.first(F.concat_ws(" ", "source", "locator")).over(
        order.rowsBetween(Window.unboundedPreceding, 0)
    )
    v = (
        index.select("rec", "source", "ordinal", "locator", "trajectory_id", "content_hash")
        .withColumn("rank", F.row_number().over(order))
        .withColumn("first", first)
    )
    v = v.join(existing.select("trajectory_id", F.col("content_hash").alias("existing_hash")), "trajectory_id", "left")
    quoted = F.concat(F.lit("'"), F.col("trajectory_id"), F.lit("'"))
    return v.select(
        "rec",
        "source",
        "locator",
        "trajectory_id",
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


def plan_writes(spark: SparkSession, cfg: Config, staging: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Where the pass writes `t` and `s` files: the tables' folders when both tables take files written by
    pyarrow (DirectAppend.layout_problem), else `<staging>/t` and `<staging>/s`; and the statistics columns of
    each table."""
    dirs, stats = {}, {}
    api = api_problem(spark)
    problems = [f"this Delta's transaction API differs ({api})"] if api else []
    for kind, name in TABLE_OF.items():
        path = ensure_table(spark, cfg, name)
        dirs[kind], stats[kind] = path, []
        if api:
            continue
        table = DirectAppend(spark, path)
        problem = table.layout_problem(FILE_SCHEMAS[kind])
        if problem:
            problems.append(f"{name}: {problem}")
        stats[kind] = table.stats_columns()
    if problems:
        log.warning("ingest writes through Spark, not by committing its own files: %s", "; ".join(problems))
        dirs = {kind: f"{staging.rstrip('/')}/{kind}" for kind in TABLE_OF}
    return dirs, stats


def _read(spark: SparkSession, paths: list[str], kind: str) -> DataFrame:
    if not paths:
        return spark.createDataFrame([], FILE_SCHEMAS[kind])
    return spark.read.schema(FILE_SCHEMAS[kind]).parquet(*paths)


REWRITTEN = StructType([StructField("kind", StringType(), False), StructField("source", StringType(), False),
                        *FILES.fields[1:]])


def _rewrite(table: pa.Table, *, files: dict[str, dict[str, str]], stats_columns: dict[str, list[str]]) -> pa.Table:
    """applyInArrow, per task group: rewrite its `t` / `s` files with only the rows to keep (flags keep_t /
    keep_s per index row), beside the originals; one REWRITTEN row per file written (source: the original)."""
    table = table.sort_by("pos")
    group = table.column("group")[0].as_py()
    keep_t = table.column("keep_t").to_numpy(zero_copy_only=False).astype(bool)
    keep_s = np.repeat(
        table.column("keep_s").to_numpy(zero_copy_only=False).astype(bool),
        table.column("s_rows").to_numpy(zero_copy_only=False),
    )
    out: dict[str, list[Any]] = {name: [] for name in REWRITTEN.fieldNames()}
    for kind, keep in ((TRAJECTORY, keep_t), (STEP, keep_s)):
        source = files[group].get(kind)
        if source is None or keep.all() or not keep.any():
            continue  # committed as it is, or deleted
        fs, path = filesystem(source)
        rows = pq.read_table(path, filesystem=fs, schema=_ARROW[kind]).filter(pa.array(keep))
        target = f"{source.rsplit('/', 1)[0]}/{group}-{uuid.uuid4().hex[:8]}-c000.snappy.parquet"
        size, stats = write_parquet(target, _ARROW[kind], rows.to_batches(max_chunksize=BATCH_ROWS * 10),
                                    stats_columns.get(kind, []))
        for name, value in zip(
            REWRITTEN.fieldNames(), (kind, source, target, rows.num_rows, size, stats, group), strict=True
        ):
            out[name].append(value)
    return pa.Table.from_pydict(out, schema=to_arrow_schema(REWRITTEN))


def _delete(paths: list[str]) -> None:
    for path in paths:
        fs, p = filesystem(path)
        try:
            fs.delete_file(p)
        except FileNotFoundError:
            pass


def _write(
    spark: SparkSession, cfg: Config, kind: str, txn: DirectAppend | LatestTable, files: list[dict[str, Any]]
) -> set[str]:
    """Commit `files` (FILES-like dicts) to the table of `kind` in `txn`, or, when they are not in the table's
    folder (staged), or a concurrent commit got in first, write their rows with insert_new. The paths
    committed as they are."""
    if not files or not sum(f["rows"] for f in files):
        return set()
    name = TABLE_OF[kind]
    folder = txn.path.rstrip("/")
    if isinstance(txn, DirectAppend) and all(f["path"].startswith(f"{folder}/") for f in files):
        data = [DataFile(f["path"][len(folder) + 1:], f["bytes"], f["rows"], f["stats"]) for f in files]
        try:
            txn.commit(data)
            return {f["path"] for f in files}
        except CONCURRENT_WRITE_ERRORS as e:
            log.info("ingest: %s changed since this ingest read it (%s); appending its new rows instead",
                     name, type(e).__name__)
    insert_new(spark, cfg, name, _read(spark, [f["path"] for f in files], kind))
    return set()


def _files_to_commit(
    index: DataFrame,
    new: DataFrame | None,
    held: DataFrame | None,
    written: list[dict[str, Any]],
    n_steps: int,
    stats_columns: dict[str, list[str]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """The `t` / `s` files whose rows go into the tables: a task's file as written when every row of it is new,
    none when no row is, else a rewrite with only its new rows (`_rewrite`). `new`: the recs to add (None:
    all); `held`: trajectory ids whose steps `steps` already holds (None: none). Returns the files to commit,
    the files the rewrite made, and the number of new steps."""
    if new is None and held is None:
        return written, [], n_steps
    plan = index.select("rec", "trajectory_id", "pos", "s_rows", "group")
    plan = plan.withColumn("keep_t", F.lit(True)) if new is None else plan.join(
        F.broadcast(new.withColumn("keep_t", F.lit(True))), "rec", "left"
    ).fillna(False, ["keep_t"])
    plan = plan.withColumn("keep_s", F.col("keep_t")) if held is None else plan.join(
        F.broadcast(held.withColumn("held", F.lit(True))), "trajectory_id", "left"
    ).withColumn("keep_s", F.col("keep_t") & F.col("held").isNull())
    plan = plan.select("group", "pos", "s_rows", "keep_t", "keep_s").persist()
    by_group: dict[str, dict[str, dict[str, Any]]] = {}
    for f in written:
        by_group.setdefault(f["group"], {})[f["kind"]] = f
    try:
        per_group = plan.groupBy("group").agg(
            F.count("*").alias("t_all"),
            F.sum(F.col("keep_t").cast("long")).alias("t_keep"),
            F.sum("s_rows").alias("s_all"),
            F.sum(F.when(F.col("keep_s"), F.col("s_rows")).otherwise(0)).alias("s_keep"),
        ).collect()
        keep, partial_groups = [], set()
        for g in per_group:
            for kind, n_keep, n_all in ((TRAJECTORY, g["t_keep"], g["t_all"]), (STEP, g["s_keep"], g["s_all"])):
                f = by_group.get(g["group"], {}).get(kind)
                if f is not None and n_keep == n_all:
                    keep.append(f)
                elif f is not None and n_keep:
                    partial_groups.add(g["group"])
        rewritten = []
        if partial_groups:
            fn = partial(
                _rewrite,
                files={g: {k: f["path"] for k, f in fs.items()} for g, fs in by_group.items()},
                stats_columns=stats_columns,
            )
            rewritten = [
                r.asDict()
                for r in plan.where(F.col("group").isin(sorted(partial_groups)))
                .groupBy("group").applyInArrow(fn, REWRITTEN).collect()
            ]
    finally:
        plan.unpersist()
    return keep + rewritten, rewritten, sum(g["s_keep"] for g in per_group)


def load(
    spark: SparkSession, cfg: Config, run_id: str, files: list[Row], stats_columns: dict[str, list[str]]
) -> dict[str, int]:
    """Commit (or write) the rows of one batch: `files` are the FILES rows of the Python pass, `stats_columns`
    the tables' statistics columns (plan_writes); stats (read, accepted, new, already_present, quarantined,
    ...)."""
    files = [f.asDict() for f in files]
    rows = {kind: sum(f["rows"] for f in files if f["kind"] == kind) for kind in FILE_SCHEMAS}
    ok, malformed = rows[TRAJECTORY], rows[QUARANTINED]
    index = _read(spark, [f["path"] for f in files if f["kind"] == INDEX], INDEX)
    written = [f for f in files if f["kind"] in TABLE_OF]
    committed: set[str] = set()
    verdicts = None
    try:
        t_txn = snapshot(spark, ensure_table(spark, cfg, "trajectories"))
        existing = t_txn.snapshot_df()
        ids = index.select(F.count_distinct("trajectory_id")).first()[0] if ok else 0
        all_new = ids == ok and (
            t_txn.num_files == 0 or index.join(existing.select("trajectory_id"), "trajectory_id", "left_semi").isEmpty()
        )
        if all_new:  # no id twice in the batch nor already in the table (a first ingest, or new logs)
            counts, rejected, new = {"new": ok}, None, None
        else:
            verdicts = _verdicts(index, existing).persist()  # one snapshot of the table for every use
            counts = {r["verdict"]: r["n"] for r in verdicts.groupBy("verdict").agg(F.count("*").alias("n")).collect()}
            rejected = verdicts.filter(F.col("verdict").isin("duplicate", "conflict")).select(
                "source", "locator", F.col("trajectory_id").alias("record_id"), "reason",
                F.lit(None).cast("string").alias("raw"),
            )
            new = verdicts.filter(F.col("verdict") == "new").select("rec")

        n_rejected = counts.get("duplicate", 0) + counts.get("conflict", 0)
        if malformed + n_rejected:  # skipped when empty: ~2 s of Delta
            bad = _read(spark, [f["path"] for f in files if f["kind"] == QUARANTINED], QUARANTINED)
            quarantine = bad.select("source", "locator", "record_id", "reason", "raw")
            if rejected is not None:
                quarantine = quarantine.unionByName(rejected)
            merge(
                spark, cfg, "quarantine",
                quarantine.withColumns({"run_id": F.lit(run_id), "quarantined_at": F.lit(now())}),
                stable_source=True,
            )

        # Steps of new records whose trajectory `steps` already holds: a run killed between the two commits.
        s_txn = snapshot(spark, ensure_table(spark, cfg, "steps"))
        held = None
        if s_txn.num_files and ok:
            candidates = index if new is None else index.join(F.broadcast(new), "rec", "left_semi")
            held = candidates.select("trajectory_id").join(
                s_txn.snapshot_df().select("trajectory_id"), "trajectory_id", "left_semi"
            ).distinct()
            if held.isEmpty():
                held = None

        keep, rewritten, steps_new = _files_to_commit(index, new, held, written, rows[STEP], stats_columns)
        written += rewritten
        committed |= _write(spark, cfg, STEP, s_txn, [f for f in keep if f["kind"] == STEP])
        committed |= _write(spark, cfg, TRAJECTORY, t_txn, [f for f in keep if f["kind"] == TRAJECTORY])
    finally:
        if verdicts is not None:
            verdicts.unpersist()
    _delete([f["path"] for f in written if f["path"] not in committed])

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
