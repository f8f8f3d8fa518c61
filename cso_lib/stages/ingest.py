"""Ingest stage: raw logs (JSONL / JSON-array files, or a Delta table of raw records) -> `trajectories`,
`steps` and `quarantine`.

One pass parses: the driver lists the input and cuts it into byte splits of about `ingest.split_bytes`
(a JSON-array file is one split); `mapInArrow` reads each split on an executor, aligned to line boundaries,
turns every record into rows (trajectory + steps, or quarantined + reason) with cso_lib.ingest and writes
them to Parquet itself: `trajectories` and `steps` rows into the tables' folders, uncommitted, and an index
and the quarantined records into a staging folder (see cso_lib.stages.ingest_load); only the file names come
back. Then verdicts decide, per accepted record, new / already present / duplicate in this batch / conflicting
with an ingested trajectory of the same id (skipped when no id repeats and none is in the table), quarantine
is MERGEd, and the files of new rows are committed to `steps`, then `trajectories` (the trajectory row last,
so a crash between the two is repaired by the rerun), in Delta transactions that read the table (not blind).
Re-ingesting the same input adds nothing. Counts reconcile: read = accepted + quarantined, accepted = new +
already_present.

Files are opened and written with pyarrow.fs, so input paths, the warehouse and `storage.staging_dir` may be
local or URIs pyarrow understands (s3:// or s3a://, gs://, hdfs://).
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from functools import partial
from typing import Any, BinaryIO

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_commit import filesystem
from cso_lib.delta_io import ensure_tables, new_run_id, now, stage_run
from cso_lib.errors import InputError, RecordError
from cso_lib.ingest import RAW_HEAD_BYTES, convert, fast_native, iter_jsonl, load, raw_head, record_id
from cso_lib.stages.ingest_load import FILES, Staging, plan_writes
from cso_lib.stages.ingest_load import load as load_staged

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json")
SPLITS = StructType(
    [
        StructField("path", StringType(), nullable=False),
        StructField("start", LongType(), nullable=False),
        StructField("end", LongType(), nullable=False),
        StructField("kind", StringType(), nullable=False),  # jsonl | array
    ]
)

def _open(path: str) -> BinaryIO:
    fs, p = filesystem(path)
    return io.BufferedReader(fs.open_input_file(p), buffer_size=1 << 20)


def _stage_record(
    out: Staging, source: str, locator: str, ordinal: int, data: bytes, size: int, max_bytes: int, env: str
) -> None:
    record = None
    try:
        fast = fast_native(data, env) if size <= max_bytes else None
        if fast is not None:
            out.ok(source, locator, ordinal, fast, size)
            return
        record = load(data, size, max_bytes)
        out.ok(source, locator, ordinal, convert(record, env), size)
    except RecordError as e:
        out.bad(source, locator, ordinal, str(e), raw_head(data), record_id(record))


def _array_records(out: Staging, path: str, max_bytes: int, env: str) -> None:
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
            out.flush()


def read_splits(
    batches: Iterator[pa.RecordBatch], max_bytes: int, env: str, writes: dict[str, Any]
) -> Iterator[pa.RecordBatch]:
    """mapInArrow: SPLITS rows -> the files of every record found in each split (see Staging); FILES rows."""
    out = Staging(**writes)
    for batch in batches:
        for path, start, end, kind in zip(*batch.to_pydict().values(), strict=True):
            if kind == "array":
                _array_records(out, path, max_bytes, env)
                continue
            with _open(path) as f:
                for raw in iter_jsonl(f, start, end, max_bytes):
                    locator = f"line {raw.line}" if raw.line is not None else f"byte {raw.offset}"
                    _stage_record(out, path, locator, raw.offset, raw.data, raw.size, max_bytes, env)
                    if out.full:
                        out.flush()
    yield out.close()


def convert_rows(
    batches: Iterator[pa.RecordBatch], source: str, max_bytes: int, env: str, writes: dict[str, Any]
) -> Iterator[pa.RecordBatch]:
    """mapInArrow: rows (raw, name, block) of a Delta table of raw logs -> files (see Staging); FILES rows.

    Without an id column a record is located by its Parquet file, the file's block, and its row there.
    """
    out = Staging(**writes)
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
                out.flush()
    yield out.close()


def list_files(paths: list[str]) -> list[tuple[str, int]]:
    """(path, size) of every input file: the files named, and the log files directly inside folders."""
    found: dict[str, int] = {}
    for path in paths:
        fs, p = filesystem(path)
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


def _from_files(cfg: Config, spark: SparkSession, writes: dict[str, Any]) -> DataFrame:
    paths = cfg.ingest.paths or [cfg.sim_logs_dir]
    splits = plan_splits(list_files(paths), cfg.ingest.split_bytes)
    # One split per task. Local rows, dealt round-robin: no Python RDD (whose conversion runs a Python worker
    # of its own beside the one of mapInArrow).
    planned = spark.createDataFrame(splits, SPLITS).repartition(max(len(splits), 1))
    fn = partial(read_splits, max_bytes=cfg.ingest.max_record_bytes, env=cfg.ingest.default_env, writes=writes)
    return planned.mapInArrow(fn, FILES)


def _from_table(cfg: Config, spark: SparkSession, writes: dict[str, Any]) -> DataFrame:
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
    fn = partial(
        convert_rows, source=path, max_bytes=cfg.ingest.max_record_bytes, env=cfg.ingest.default_env,
        writes=writes,
    )
    return located.mapInArrow(fn, FILES)


def run(cfg: Config, spark: SparkSession) -> dict:
    """Ingest the configured raw logs; stats (read, accepted, new, already_present, quarantined, ...)."""
    run_id = cfg.run_id or new_run_id("ingest")
    staging = f"{cfg.storage.staging_path.rstrip('/')}/ingest-{run_id}-{secrets.token_hex(4)}"
    fs, root = filesystem(staging)
    with stage_run(spark, cfg, run_id, "ingest") as stats:
        stats["run_id"] = run_id
        try:
            ensure_tables(spark, cfg, ("trajectories", "steps", "quarantine", "runs"))
            dirs, stats_columns = plan_writes(spark, cfg, staging)
            writes = {"staging": staging, "dirs": dirs, "run_id": run_id, "stamp": now(),
                      "stats_columns": stats_columns}
            source = _from_table(cfg, spark, writes) if cfg.ingest.source_table else _from_files(cfg, spark, writes)
            stats.update(load_staged(spark, cfg, run_id, source.collect(), stats_columns))
        finally:
            if fs.get_file_info(root).type != pafs.FileType.NotFound:
                fs.delete_dir(root)
    return stats
