"""Append Parquet files written outside Spark (by pyarrow, in the ingest's Python tasks) to a Delta table in one
Delta transaction, with Delta's own conflict detection.

OSS Delta Lake has no public API to commit files written by another writer, so this drives Delta's own
transaction classes through py4j (`DeltaLog.forTable(...).startTransaction()`, `Action.fromJson`,
`OptimisticTransaction.commit` with a WRITE operation): what Delta's writer does after writing its files.
The ingest uses it so that the 1 GB+ of JSON text its Python pass has already encoded to Parquet is not
decoded and re-encoded by a second Spark write.

The transaction starts when a `DirectAppend` is made: `version` and `num_files` are those of its snapshot,
and `snapshot_df()` reads the table as of that version (for the caller's anti-join). `commit` declares that
the transaction read the whole table (the commit is not blind), so a commit that added files after the
snapshot makes it fail with ConcurrentAppendException, exactly like `delta_io.insert_new`; the caller then
falls back to insert_new, which re-reads the table.

Files are only appended when the table's layout lets a plain Parquet file with the table's columns be read
as its rows: unpartitioned, no column mapping, no CHECK constraints, and the expected schema with no column
metadata (generated or identity columns, defaults, invariants). `layout_problem` says which rule a table
breaks; the ingest then writes through Spark.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import StructType

from cso_lib.errors import InputError

DEFAULT_INDEXED_COLS = 32  # Delta's delta.dataSkippingNumIndexedCols
STATS_TEXT_CHARS = 256  # string statistics longer than this: min cut to a prefix, max left out


@dataclass(frozen=True)
class DataFile:
    """A Parquet file in the table's folder: its name there, size in bytes, rows, and Delta stats JSON."""

    name: str
    size: int
    rows: int
    stats: str


class FileStats:
    """Delta statistics of one file, batch by batch: numRecords, and nullCount, minValues and maxValues of the
    table's statistics columns (min and max for strings, integers and doubles without NaN; a string min over
    STATS_TEXT_CHARS characters is cut to a prefix, which is still a lower bound, and such a max left out)."""

    def __init__(self, schema: pa.Schema, columns: list[str]) -> None:
        self.columns = [c for c in columns if c in schema.names]
        self.rows = 0
        self.nulls = dict.fromkeys(self.columns, 0)
        self.low: dict[str, Any] = {}
        self.high: dict[str, Any] = {}
        self.bounded = {
            c: pa.types.is_string(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
            for c in self.columns
            for t in [schema.field(c).type]
        }

    def update(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        for c in self.columns:
            values = batch.column(c)
            self.nulls[c] += values.null_count
            if not self.bounded[c] or values.null_count == len(values):
                continue
            if pa.types.is_floating(values.type) and pc.any(pc.is_nan(values)).as_py():
                self.bounded[c] = False
                continue
            low, high = (v.as_py() for v in pc.min_max(values).values())
            self.low[c] = low if c not in self.low else min(self.low[c], low)
            self.high[c] = high if c not in self.high else max(self.high[c], high)

    def json(self) -> str:
        low, high = {}, {}
        for c in self.columns:
            if not self.bounded[c] or c not in self.low:
                continue
            lo, hi = self.low[c], self.high[c]
            low[c] = lo[:STATS_TEXT_CHARS] if isinstance(lo, str) else lo
            if not (isinstance(hi, str) and len(hi) > STATS_TEXT_CHARS):
                high[c] = hi
        return json.dumps(
            {"numRecords": self.rows, "minValues": low, "maxValues": high, "nullCount": self.nulls},
            separators=(",", ":"),
        )


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


def require_values(batch: pa.RecordBatch | pa.Table, where: str) -> None:
    """Raise when a column its schema declares non-nullable holds a null (Delta's writer checks the table's
    NOT NULL invariants; a file committed directly is not checked by Delta)."""
    for field, values in zip(batch.schema, batch.columns, strict=True):
        if not field.nullable and values.null_count:
            raise ValueError(f"{where}: a row has no {field.name!r}")


def write_parquet(uri: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch], stats_columns: list[str]) -> tuple[int, str]:
    """Write `batches` to one Parquet file at `uri` (snappy, a row group per batch); its size in bytes and its
    Delta statistics JSON (FileStats over `stats_columns`)."""
    fs, path = filesystem(uri)
    stats = FileStats(schema, stats_columns)
    with pq.ParquetWriter(path, schema, filesystem=fs, compression="snappy") as writer:
        for batch in batches:
            stats.update(batch)
            writer.write_batch(batch)
    return fs.get_file_info(path).size, stats.json()


def _delta(spark: SparkSession) -> Any:
    return spark._jvm.org.apache.spark.sql.delta  # type: ignore[attr-defined]


def _to_list(spark: SparkSession, items: list[Any]) -> Any:
    """A Scala immutable List of JVM objects."""
    jvm = spark._jvm  # type: ignore[attr-defined]
    return jvm.scala.jdk.javaapi.CollectionConverters.asScala(jvm.java.util.ArrayList(items)).toList()


_API: dict[int, str | None] = {}  # id of the JVM gateway -> api_problem's answer


def api_problem(spark: SparkSession) -> str | None:
    """Why this JVM's Delta lacks the transaction API DirectAppend drives (a Delta other than the pinned
    delta-spark 4.0, e.g. a vendor's runtime); None when it has it. Checked once per JVM by reflection."""
    key = id(spark.sparkContext._gateway)  # type: ignore[attr-defined]
    if key not in _API:
        _API[key] = _api_problem(spark)
    return _API[key]


def _api_problem(spark: SparkSession) -> str | None:
    jvm = spark._jvm  # type: ignore[attr-defined]
    loader = jvm.java.lang.Thread.currentThread().getContextClassLoader()
    wanted = {
        "org.apache.spark.sql.delta.OptimisticTransaction": {
            ("readWholeTable", 0), ("commit", 2), ("registerSQLMetrics", 2), ("snapshot", 0)},
        "org.apache.spark.sql.delta.DeltaLog": {("startTransaction", 0)},
        "org.apache.spark.sql.delta.actions.Action": {("fromJson", 1)},
    }
    try:
        for name, methods in wanted.items():
            have = {(m.getName(), len(m.getParameterTypes())) for m in loader.loadClass(name).getMethods()}
            if not methods <= have:
                return f"{name} lacks {sorted(methods - have)}"
        write = loader.loadClass("org.apache.spark.sql.delta.DeltaOperations$Write")
        if 4 not in {len(c.getParameterTypes()) for c in write.getConstructors()}:
            return "DeltaOperations.Write has no 4-argument constructor"
    except Exception as e:  # noqa: BLE001 - a missing class arrives as a Py4JJavaError
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


class DirectAppend:
    """One Delta transaction on the table at `path` (started now) that appends externally written files."""

    def __init__(self, spark: SparkSession, path: str) -> None:
        self.spark = spark
        self.path = path
        self.log = _delta(spark).DeltaLog.forTable(spark._jsparkSession, path)
        self.txn = self.log.startTransaction()
        self.snapshot = snapshot = self.txn.snapshot()
        self.version = int(snapshot.version())
        metadata = snapshot.metadata()
        self.schema = StructType.fromJson(json.loads(metadata.schemaString()))
        self.partitioned = int(metadata.partitionColumns().size()) > 0
        conf = spark._jvm.scala.jdk.javaapi.CollectionConverters.asJava(metadata.configuration())  # type: ignore[attr-defined]
        self.configuration = {str(k): str(conf.get(k)) for k in conf.keySet()}

    @property
    def num_files(self) -> int:
        """Data files in the snapshot: `numFiles` of the version's checksum file (`_delta_log/<v>.crc`, which
        Delta writes at each commit), else by reconstructing the snapshot's state (a Spark job). (Delta's own
        `numOfFilesIfKnown` reads the same file but took about a second per table here.)"""
        fs, crc = filesystem(f"{self.path.rstrip('/')}/_delta_log/{self.version:020d}.crc")
        try:
            with fs.open_input_stream(crc) as f:
                return int(json.loads(f.read())["numFiles"])
        except (FileNotFoundError, KeyError, ValueError, TypeError, OSError):
            return int(self.snapshot.numOfFiles())

    def layout_problem(self, expected: StructType) -> str | None:
        """Why files with the `expected` columns cannot be appended as they are; None when they can."""
        if self.partitioned:
            return "the table is partitioned"
        if self.configuration.get("delta.columnMapping.mode", "none") != "none":
            return "the table uses column mapping"
        if any(k.startswith("delta.constraints.") for k in self.configuration):
            return "the table has CHECK constraints"
        if any(f.metadata for f in self.schema.fields):
            return "a column carries metadata (generated, identity, default or invariant)"
        have = [(f.name, f.dataType) for f in self.schema.fields]
        want = [(f.name, f.dataType) for f in expected.fields]
        if have != want:
            return f"the table's columns differ from {[n for n, _ in want]!r}"
        return None

    def stats_columns(self) -> list[str]:
        """The columns Delta keeps data-skipping statistics for (its table property, else the first 32)."""
        named = self.configuration.get("delta.dataSkippingStatsColumns")
        if named:
            return [c.strip().strip("`") for c in named.split(",") if c.strip()]
        n = int(self.configuration.get("delta.dataSkippingNumIndexedCols", DEFAULT_INDEXED_COLS))
        names = self.schema.fieldNames()
        return names if n < 0 else names[:n]

    def snapshot_df(self) -> DataFrame:
        """The table as of this transaction's snapshot."""
        return self.spark.read.format("delta").option("versionAsOf", self.version).load(self.path)

    def write(self, rows: pa.Table) -> DataFile:
        """Write `rows` (the table's columns) to one Parquet file in the table's folder, uncommitted."""
        name = f"part-00000-{uuid.uuid4()}-c000.snappy.parquet"
        size, stats = write_parquet(f"{self.path.rstrip('/')}/{name}", rows.schema, rows.to_batches(),
                                    self.stats_columns())
        return DataFile(name, size, rows.num_rows, stats)

    def commit(self, files: list[DataFile], read_whole_table: bool = True) -> int:
        """Commit `files` (already in the table's folder) as one WRITE (append); the new version. By default
        the transaction read the whole table: Delta's concurrent-write errors are raised when the table
        changed since the snapshot. With `read_whole_table=False` it is a blind append, which conflicts with
        nobody (Delta retries it at the next version by itself)."""
        spark, delta = self.spark, _delta(self.spark)
        jvm = spark._jvm  # type: ignore[attr-defined]
        if read_whole_table:
            self.txn.readWholeTable()
        mtime = int(time.time() * 1000)
        actions = [
            delta.actions.Action.fromJson(json.dumps({"add": {
                "path": f.name, "partitionValues": {}, "size": f.size, "modificationTime": mtime,
                "dataChange": True, "stats": f.stats,
            }}))
            for f in files
        ]
        metrics = {"numFiles": len(files), "numOutputBytes": sum(f.size for f in files),
                   "numOutputRows": sum(f.rows for f in files)}
        sc = spark.sparkContext._jsc.sc()  # type: ignore[union-attr]
        jmetrics = jvm.java.util.HashMap()
        for name, value in metrics.items():
            metric = jvm.org.apache.spark.sql.execution.metric.SQLMetrics.createMetric(sc, name)
            metric.add(value)
            jmetrics.put(name, metric)
        self.txn.registerSQLMetrics(spark._jsparkSession, jvm.org.apache.spark.api.python.PythonUtils.toScalaMap(jmetrics))
        none = jvm.scala.Option.empty()
        operation = getattr(delta, "DeltaOperations$Write")(jvm.org.apache.spark.sql.SaveMode.Append, none, none, none)
        return int(self.txn.commit(_to_list(spark, actions), operation))


def append_rows(spark: SparkSession, path: str, schema: StructType, rows: list[tuple]) -> bool:
    """Blind-append a few `rows` (tuples in `schema`'s order) to the Delta table at `path` with one file
    written by pyarrow and a direct commit: no Spark job (a Spark append of one row costs a job and ~0.5 s).
    False, writing nothing, when the table's layout does not allow it; the caller then appends with Spark."""
    if api_problem(spark) is not None:
        return False
    table = DirectAppend(spark, path)
    if table.layout_problem(schema) is not None:
        return False
    arrow = to_arrow_schema(schema)
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(arrow)
    data = pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, arrow, strict=True)], schema=arrow)
    require_values(data, path)
    table.commit([table.write(data)], read_whole_table=False)
    return True


class LatestTable:
    """What the ingest reads of a table when this Delta lacks DirectAppend's API: the latest version, its
    number of files from Delta's public API (DESCRIBE DETAIL). No commits."""

    def __init__(self, spark: SparkSession, path: str) -> None:
        self.spark, self.path = spark, path

    @property
    def num_files(self) -> int:
        from delta.tables import DeltaTable

        return int(DeltaTable.forPath(self.spark, self.path).detail().select("numFiles").first()[0])

    def snapshot_df(self) -> DataFrame:
        return self.spark.read.format("delta").load(self.path)


def snapshot(spark: SparkSession, path: str) -> DirectAppend | LatestTable:
    """A DirectAppend on the table at `path`, or its LatestTable when this Delta lacks the API."""
    return DirectAppend(spark, path) if api_problem(spark) is None else LatestTable(spark, path)
