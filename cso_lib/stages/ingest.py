"""Ingest stage: raw logs (JSONL / JSON-array files, or a Delta table of raw records) -> `trajectories`,
`steps` and `quarantine`.

One pass parses: the driver lists the input and cuts it into byte splits of about `ingest.split_bytes`
(a JSON-array file is one split); `mapInArrow` reads each split on an executor, aligned to line boundaries,
and turns every record into staging rows (trajectory + steps, or quarantined + reason) with
cso_lib.ingest. The staging rows are flat (one per trajectory, per step, per quarantined record; see
cso_lib.stages.ingest_load) and persisted once; then verdicts decide, per ok row, new / already present /
duplicate in this batch / conflicting with an ingested trajectory of the same id (skipped on a first ingest
without duplicate ids), and insert-only writes fill quarantine, steps, then trajectories (the trajectory row
last, so a crash between the two is repaired by the rerun). Re-ingesting the same input adds nothing.
Counts reconcile: read = accepted + quarantined, accepted = new + already_present.

Files are opened with pyarrow.fs, so paths may be local or URIs pyarrow understands (s3://, gs://, hdfs://).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from functools import partial
from typing import BinaryIO

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_io import new_run_id, stage_run
from cso_lib.errors import InputError, RecordError
from cso_lib.ingest import RAW_HEAD_BYTES, convert, iter_jsonl, load, raw_head, record_id
from cso_lib.stages.ingest_load import STAGING, Staging
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

def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def _open(path: str) -> BinaryIO:
    fs, p = _fs(path)
    return io.BufferedReader(fs.open_input_file(p), buffer_size=1 << 20)


def _stage_record(
    out: Staging, source: str, locator: str, ordinal: int, data: bytes, size: int, max_bytes: int, env: str
) -> None:
    record = None
    try:
        record = load(data, size, max_bytes)
        out.ok(source, locator, ordinal, convert(record, env), size)
    except RecordError as e:
        out.bad(source, locator, ordinal, str(e), raw_head(data), record_id(record))


def _array_records(out: Staging, path: str, max_bytes: int, env: str) -> Iterator[pa.RecordBatch]:
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
    out = Staging()
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
    out = Staging()
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


def run(cfg: Config, spark: SparkSession) -> dict:
    """Ingest the configured raw logs; stats (read, accepted, new, already_present, quarantined, ...)."""
    run_id = cfg.run_id or new_run_id("ingest")
    with stage_run(spark, cfg, run_id, "ingest") as stats:
        stats["run_id"] = run_id
        source = _from_table(cfg, spark) if cfg.ingest.source_table else _from_files(cfg, spark)
        stats.update(load_staged(spark, cfg, run_id, source))
    return stats
