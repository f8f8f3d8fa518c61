"""Ingest stage: raw logs (JSONL / JSON-array files, or a Delta table of raw records) -> `trajectories`,
`steps` and `quarantine`.

One pass parses: the driver lists the input and cuts it into byte splits of about `ingest.split_bytes`
(a JSON-array file is one split); `mapInArrow` reads each split on an executor, aligned to line boundaries,
and turns every record into one staging row (ok + canonical columns + steps, or quarantined + reason) with
cso_lib.ingest. The staging rows are written once as Parquet under `<staging>/<run_id>`; then a small
verdict table decides, per ok row, new / already present / duplicate in this batch / conflicting with an
ingested trajectory of the same id, and three insert-only MERGEs write quarantine, steps, then trajectories
(the trajectory row last, so a crash between the two MERGEs is repaired by the rerun). Re-ingesting the
same input adds nothing. Counts reconcile: read = accepted + quarantined, accepted = new + already_present.

Files are opened with pyarrow.fs, so paths may be local or URIs pyarrow understands (s3://, gs://, hdfs://).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from functools import partial
from itertools import chain
from operator import attrgetter
from typing import Any, BinaryIO

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import ArrayType, IntegerType, LongType, StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_io import merge, new_run_id, now, read_table, stage_run
from cso_lib.errors import InputError, RecordError
from cso_lib.ingest import RAW_HEAD_BYTES, Trajectory, convert, iter_jsonl, load, raw_head, record_id
from schemas.tables import TRAJECTORIES

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json")
BATCH_ROWS = 2048
BATCH_BYTES = 32 * 1024 * 1024

SPLITS = StructType(
    [
        StructField("path", StringType(), nullable=False),
        StructField("start", LongType(), nullable=False),
        StructField("end", LongType(), nullable=False),
        StructField("kind", StringType(), nullable=False),  # jsonl | array
    ]
)

STEP = StructType(
    [
        StructField("step_idx", IntegerType(), nullable=False),
        StructField("action", StringType(), nullable=False),
        StructField("observations", StringType(), nullable=False),
        StructField("action_tool", StringType(), nullable=True),
    ]
)

_TRAJECTORY_COLUMNS = [
    f.name for f in TRAJECTORIES.fields if f.name not in ("source", "locator", "ingest_run_id", "ingested_at")
]

# One row per input record: ok rows carry the trajectory columns and its steps, quarantined rows the reason.
STAGING = StructType(
    [
        StructField("status", StringType(), nullable=False),  # ok | quarantined
        StructField("reason", StringType(), nullable=True),
        StructField("source", StringType(), nullable=False),
        StructField("locator", StringType(), nullable=False),
        StructField("ordinal", LongType(), nullable=False),  # byte offset, array index or row: orders records
        StructField("record_id", StringType(), nullable=True),
        StructField("raw", StringType(), nullable=True),  # first 4 KiB, quarantined rows only
        *[
            StructField(f.name, f.dataType, nullable=True)
            for f in TRAJECTORIES.fields
            if f.name in _TRAJECTORY_COLUMNS
        ],
        StructField("steps", ArrayType(STEP, containsNull=False), nullable=True),
    ]
)
_SCALARS = [f.name for f in STAGING.fields if f.name != "steps"]
_trajectory_values = attrgetter(*_TRAJECTORY_COLUMNS)


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def _open(path: str) -> BinaryIO:
    fs, p = _fs(path)
    return io.BufferedReader(fs.open_input_file(p), buffer_size=1 << 20)


class _Staging:
    """Accumulates staging rows column-wise and emits Arrow record batches of the STAGING schema."""

    schema = to_arrow_schema(STAGING)

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.cols: dict[str, list[Any]] = {name: [] for name in _SCALARS}
        self.offsets = [0]
        self.steps: tuple[list[Any], ...] = ([], [], [], [])
        self.nbytes = 0

    def ok(self, source: str, locator: str, ordinal: int, t: Trajectory, size: int) -> None:
        row = (("ok", None, source, locator, ordinal, t.trajectory_id, None), _trajectory_values(t))
        for values, value in zip(self.cols.values(), chain(*row), strict=True):
            values.append(value)
        idx, actions, observations, tools = self.steps
        for i, step in enumerate(t.steps):
            idx.append(i)
            actions.append(step.action)
            observations.append(step.observations)
            tools.append(step.action_tool)
        self.offsets.append(len(idx))
        self.nbytes += size

    def bad(self, source: str, locator: str, ordinal: int, reason: str, raw: str, rid: str | None) -> None:
        row = {"status": "quarantined", "reason": reason, "source": source, "locator": locator}
        row |= {"ordinal": ordinal, "record_id": rid, "raw": raw}
        for name, values in self.cols.items():
            values.append(row.get(name))
        self.offsets.append(self.offsets[-1])
        self.nbytes += len(raw)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def full(self) -> bool:
        return len(self) >= BATCH_ROWS or self.nbytes >= BATCH_BYTES

    def flush(self) -> pa.RecordBatch:
        steps_type = self.schema.field("steps").type
        values = pa.StructArray.from_arrays(
            [pa.array(v, type=steps_type.value_type.field(i).type) for i, v in enumerate(self.steps)],
            fields=list(steps_type.value_type),
        )
        arrays = [pa.array(self.cols[name], type=self.schema.field(name).type) for name in _SCALARS]
        arrays.append(pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), values, type=steps_type))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        self.reset()
        return batch


def _stage_record(
    out: _Staging, source: str, locator: str, ordinal: int, data: bytes, size: int, max_bytes: int, env: str
) -> None:
    record = None
    try:
        record = load(data, size, max_bytes)
        out.ok(source, locator, ordinal, convert(record, env), size)
    except RecordError as e:
        out.bad(source, locator, ordinal, str(e), raw_head(data), record_id(record))


def _array_records(out: _Staging, path: str, max_bytes: int, env: str) -> Iterator[pa.RecordBatch]:
    with _open(path) as f:
        text = f.read()
    try:
        records = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        out.bad(path, "file", 0, f"invalid JSON array file: {e}", raw_head(text), None)
        return
    for i, record in enumerate(records):
        data = orjson.dumps(record)
        try:
            if len(data) > max_bytes:
                raise RecordError(f"record is {len(data)} bytes, over ingest.max_record_bytes={max_bytes}")
            out.ok(path, f"[{i}]", i, convert(record, env), len(data))
        except RecordError as e:
            out.bad(path, f"[{i}]", i, str(e), raw_head(data), record_id(record))
        if out.full:
            yield out.flush()


def read_splits(batches: Iterator[pa.RecordBatch], max_bytes: int, env: str) -> Iterator[pa.RecordBatch]:
    """mapInArrow: SPLITS rows -> STAGING rows, one per record found in each split."""
    out = _Staging()
    for batch in batches:
        for path, start, end, kind in zip(*batch.to_pydict().values(), strict=True):
            if kind == "array":
                yield from _array_records(out, path, max_bytes, env)
                continue
            with _open(path) as f:
                for raw in iter_jsonl(f, start, end, max_bytes):
                    locator = f"line {raw.line}" if raw.line is not None else f"byte {raw.offset}"
                    _stage_record(out, path, locator, raw.offset, raw.data, raw.size, max_bytes, env)
                    if out.full:
                        yield out.flush()
    if len(out):
        yield out.flush()


def convert_rows(
    batches: Iterator[pa.RecordBatch], source: str, max_bytes: int, env: str
) -> Iterator[pa.RecordBatch]:
    """mapInArrow: rows (raw, name, block) of a Delta table of raw logs -> STAGING rows.

    Without an id column a record is located by its Parquet file, the file's block, and its row there.
    """
    out = _Staging()
    seen: dict[tuple[str, int], int] = {}
    for batch in batches:
        for raw, name, block in zip(*batch.to_pydict().values(), strict=True):
            if block is None:  # named by the id column
                locator, ordinal = name, 0
            else:
                ordinal = seen.get((name, block), 0)
                seen[(name, block)] = ordinal + 1
                locator = f"{name} block {block} row {ordinal}"
            data = (raw or "").encode()
            _stage_record(out, source, locator, ordinal, data, len(data), max_bytes, env)
            if out.full:
                yield out.flush()
    if len(out):
        yield out.flush()


def list_files(paths: list[str]) -> list[tuple[str, int]]:
    """(path, size) of every input file: the files named, and the log files directly inside folders."""
    found: dict[str, int] = {}
    for path in paths:
        fs, p = _fs(path)
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"ingest input {path!r} does not exist")
        if info.type == pafs.FileType.Directory:
            for child in sorted(fs.get_file_info(pafs.FileSelector(p)), key=lambda i: i.base_name):
                name = child.base_name
                if child.type == pafs.FileType.File and name.endswith(FILE_SUFFIXES) and name[0] not in "._":
                    found[f"{path.rstrip('/')}/{name}"] = child.size
        else:
            found[path] = info.size
    return sorted(found.items())


def plan_splits(files: list[tuple[str, int]], split_bytes: int) -> list[tuple[str, int, int, str]]:
    """Byte ranges to read: JSON-array files (first non-blank byte `[`) whole, JSONL in split_bytes pieces."""
    splits = []
    for path, size in files:
        with _open(path) as f:
            is_array = f.read(RAW_HEAD_BYTES).lstrip()[:1] == b"["
        if is_array:
            splits.append((path, 0, size, "array"))
        else:
            splits.extend((path, s, min(s + split_bytes, size), "jsonl") for s in range(0, size, split_bytes))
    return splits


def _from_files(cfg: Config, spark: SparkSession) -> DataFrame:
    paths = cfg.ingest.paths or [cfg.sim_logs_dir]
    splits = plan_splits(list_files(paths), cfg.ingest.split_bytes)
    rdd = spark.sparkContext.parallelize(splits, max(len(splits), 1))  # one split per task
    fn = partial(read_splits, max_bytes=cfg.ingest.max_record_bytes, env=cfg.ingest.default_env)
    return spark.createDataFrame(rdd, SPLITS).mapInArrow(fn, STAGING)


def _from_table(cfg: Config, spark: SparkSession) -> DataFrame:
    path = cfg.ingest.source_table
    if not DeltaTable.isDeltaTable(spark, path):
        raise InputError(f"ingest.source_table {path!r} is not a Delta table (or does not exist)")
    df = spark.read.format("delta").load(path)
    for col in (cfg.ingest.raw_column, cfg.ingest.id_column):
        if col is not None and col not in df.columns:
            raise InputError(f"ingest.source_table {path!r} has no column {col!r} (columns: {df.columns!r})")
    raw = F.col(cfg.ingest.raw_column).cast("string").alias("raw")
    if cfg.ingest.id_column:
        located = df.select(
            raw,
            F.format_string(f"{cfg.ingest.id_column}=%s", cfg.ingest.id_column).alias("name"),
            F.lit(None).cast("long").alias("block"),
        )
    else:
        located = df.select(
            raw,
            F.col("_metadata.file_name").alias("name"),
            F.col("_metadata.file_block_start").alias("block"),
        )
    fn = partial(convert_rows, source=path, max_bytes=cfg.ingest.max_record_bytes, env=cfg.ingest.default_env)
    return located.mapInArrow(fn, STAGING)


def _verdicts(spark: SparkSession, cfg: Config, staged: DataFrame) -> DataFrame:
    """Per ok row: new | present | duplicate (of an earlier row of this batch) | conflict (with the table)."""
    order = Window.partitionBy("trajectory_id").orderBy("source", "ordinal", "locator")
    first = F.first(F.concat_ws(" ", "source", "locator")).over(
        order.rowsBetween(Window.unboundedPreceding, 0)
    )
    ranked = (
        staged.filter(F.col("status") == "ok")
        .select("source", "ordinal", "locator", "trajectory_id", "content_hash", "n_steps")
        .withColumn("rank", F.row_number().over(order))
        .withColumn("first", first)
    )
    existing = read_table(spark, cfg, "trajectories").select(
        "trajectory_id", F.col("content_hash").alias("existing_hash")
    )
    v = ranked.join(existing, "trajectory_id", "left")
    quoted = F.concat(F.lit("'"), F.col("trajectory_id"), F.lit("'"))
    return v.select(
        "source",
        "ordinal",
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


def _delete(spark: SparkSession, path: str) -> None:
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).delete(hpath, True)


def _load(spark: SparkSession, cfg: Config, run_id: str, staging: str) -> dict[str, int]:
    staged = spark.read.parquet(f"{staging}/records")
    _verdicts(spark, cfg, staged).write.parquet(f"{staging}/verdicts")
    verdicts = spark.read.parquet(f"{staging}/verdicts")
    status = {r["status"]: r["count"] for r in staged.groupBy("status").count().collect()}
    rows = verdicts.groupBy("verdict").agg(F.count("*").alias("n"), F.sum("n_steps").alias("steps")).collect()
    counts = {r["verdict"]: r["n"] for r in rows}
    steps_new = sum(r["steps"] for r in rows if r["verdict"] == "new")
    stamp = now()

    rejected = verdicts.filter(F.col("verdict").isin("duplicate", "conflict")).select(
        "source",
        "locator",
        F.col("trajectory_id").alias("record_id"),
        "reason",
        F.lit(None).cast("string").alias("raw"),
    )
    bad = staged.filter(F.col("status") == "quarantined").select(
        "source", "locator", "record_id", "reason", "raw"
    )
    quarantine = bad.unionByName(rejected).withColumns(
        {"run_id": F.lit(run_id), "quarantined_at": F.lit(stamp)}
    )
    if status.get("quarantined", 0) + counts.get("duplicate", 0) + counts.get("conflict", 0):
        merge(spark, cfg, "quarantine", quarantine, stable_source=True)  # skipped when empty: ~2 s of Delta

    new = staged.filter(F.col("status") == "ok").join(
        F.broadcast(verdicts.filter(F.col("verdict") == "new").select("source", "ordinal", "locator")),
        ["source", "ordinal", "locator"],  # ordinal alone is 0 for every row of a Delta source with an id column
        "left_semi",
    )
    steps = new.select("trajectory_id", F.explode("steps").alias("s")).select(
        "trajectory_id", "s.*", F.lit(run_id).alias("ingest_run_id")
    )
    merge(spark, cfg, "steps", steps, stable_source=True)
    merge(
        spark,
        cfg,
        "trajectories",
        new.drop("steps").withColumns({"ingest_run_id": F.lit(run_id), "ingested_at": F.lit(stamp)}),
        stable_source=True,
    )

    read = sum(status.values())
    quarantined = status.get("quarantined", 0) + counts.get("duplicate", 0) + counts.get("conflict", 0)
    return {
        "read": read,
        "accepted": read - quarantined,
        "new": counts.get("new", 0),
        "already_present": counts.get("present", 0),
        "quarantined": quarantined,
        "malformed": status.get("quarantined", 0),
        "duplicates": counts.get("duplicate", 0),
        "conflicts": counts.get("conflict", 0),
        "steps_new": steps_new,
        "rows_in": read,
        "rows_out": counts.get("new", 0),
    }


def run(cfg: Config, spark: SparkSession) -> dict:
    """Ingest the configured raw logs; stats (read, accepted, new, already_present, quarantined, ...)."""
    run_id = cfg.run_id or new_run_id("ingest")
    with stage_run(spark, cfg, run_id, "ingest") as stats:
        stats["run_id"] = run_id
        staging = f"{cfg.storage.staging_path.rstrip('/')}/{run_id}"
        source = _from_table(cfg, spark) if cfg.ingest.source_table else _from_files(cfg, spark)
        try:
            source.write.mode("overwrite").parquet(f"{staging}/records")
            stats.update(_load(spark, cfg, run_id, staging))
        finally:
            _delete(spark, staging)
    return stats
