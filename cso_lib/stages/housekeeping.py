"""Delta housekeeping: table properties, OPTIMIZE (Z-ordered on the columns analysts filter by) and VACUUM.

Run it on a schedule of its own (e.g. daily after the pipeline, or weekly):

    cso housekeeping [--set housekeeping.retain_hours=336] [--set 'housekeeping.tables=[steps]']
    spark-submit jobs/housekeeping.py --config infra/cluster.example.yaml

Per table it (1) sets the properties every cso table should carry (`delta_io.table_properties`, e.g. the
change data feed that incremental runs read) where a table lacks them, (2) compacts small files, Z-ordered
by `housekeeping.zorder[table]`, and (3) removes files no longer referenced and older than
`housekeeping.retain_hours`. It also deletes the staging folders of ingests that were killed before they
could delete their own (older than `housekeeping.staging_retain_hours`). OPTIMIZE commits change no data, so the pipeline may run meanwhile; Delta's
concurrent-write conflicts are retried on either side. Keep the retention longer than the time between
incremental runs: they read the change feed since the last successful run.
"""

from __future__ import annotations

import time

import pyarrow.fs as pafs
from delta.exceptions import ConcurrentDeleteDeleteException
from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from cso_lib.config import Config
from cso_lib.delta_commit import filesystem
from cso_lib.delta_io import CONCURRENT_WRITE_ERRORS, ensure_table, new_run_id, stage_run, table_properties
from cso_lib.errors import ConfigError
from schemas.tables import TABLES

RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"
SAFE_RETAIN_HOURS = 168.0  # Delta's default: below it VACUUM refuses unless the check is turned off

_retry_conflicts = retry(
    retry=retry_if_exception_type((*CONCURRENT_WRITE_ERRORS, ConcurrentDeleteDeleteException)),
    wait=wait_random_exponential(multiplier=0.5, max=10),
    stop=stop_after_attempt(6),
    reraise=True,
)


def check(cfg: Config) -> list[str]:
    """The tables to maintain; a ConfigError names an unknown table or Z-order column, or a short retention."""
    hk = cfg.housekeeping
    names = hk.tables if hk.tables is not None else list(TABLES)
    for name in [*names, *hk.zorder]:
        if name not in TABLES:
            raise ConfigError(f"housekeeping: unknown table {name!r} (tables: {sorted(TABLES)!r})")
    for name, cols in hk.zorder.items():
        bad = [c for c in cols if c not in TABLES[name].fieldNames()]
        if bad:
            raise ConfigError(f"housekeeping.zorder[{name!r}]: no column {bad!r} in table {name!r}")
    if hk.vacuum and hk.retain_hours < SAFE_RETAIN_HOURS and not hk.allow_short_retention:
        raise ConfigError(
            f"housekeeping.retain_hours={hk.retain_hours!r} is below {SAFE_RETAIN_HOURS:.0f} h: readers and "
            "incremental runs may still need those files; set housekeeping.allow_short_retention=true to insist"
        )
    return names


def _files(table: DeltaTable) -> int:
    return table.detail().select("numFiles").first()["numFiles"]


def _set_properties(spark: SparkSession, table: DeltaTable, path: str, name: str) -> list[str]:
    """Set the table properties a table lacks (older tables); returns their names."""
    have = table.detail().select("properties").first()["properties"] or {}
    missing = {k: v for k, v in table_properties(name).items() if have.get(k) != v}
    if missing:
        assignments = ", ".join(f"'{k}' = '{v}'" for k, v in missing.items())
        _retry_conflicts(spark.sql)(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({assignments})")
    return sorted(missing)


@_retry_conflicts
def _optimize(table: DeltaTable, zorder: list[str]) -> dict:
    builder = table.optimize()
    result = builder.executeZOrderBy(*zorder) if zorder else builder.executeCompaction()
    metrics = result.select("metrics.numFilesAdded", "metrics.numFilesRemoved").first()
    return {"files_added": metrics["numFilesAdded"], "files_removed": metrics["numFilesRemoved"]}


def _vacuum(table: DeltaTable, hours: float) -> int:
    """VACUUM; returns the number of files it deleted (from the table's history)."""
    table.vacuum(hours)
    end = (
        table.history(5)
        .where(F.col("operation") == "VACUUM END")
        .orderBy(F.col("version").desc())
        .select("operationMetrics")
        .first()
    )
    return int((end["operationMetrics"] or {}).get("numDeletedFiles", 0)) if end else 0


def clean_staging(cfg: Config, now: float | None = None) -> list[str]:
    """Delete the `ingest-*` folders in `storage.staging_dir` older than `housekeeping.staging_retain_hours`
    (by modification time); their paths. A finished or failed ingest deletes its own folder; these are what a
    killed one left."""
    fs, root = filesystem(cfg.storage.staging_path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    cutoff = (time.time() if now is None else now) - cfg.housekeeping.staging_retain_hours * 3600
    stale = [
        info.path
        for info in fs.get_file_info(pafs.FileSelector(root))
        if info.type == pafs.FileType.Directory
        and info.base_name.startswith("ingest-")
        and info.mtime is not None
        and info.mtime.timestamp() < cutoff
    ]
    for path in stale:
        fs.delete_dir(path)
    return sorted(stale)


def run(cfg: Config, spark: SparkSession) -> dict:
    """Maintain every table (or `housekeeping.tables`); stats per table: properties set, files before/after."""
    hk = cfg.housekeeping
    names = check(cfg)
    run_id = cfg.run_id or new_run_id("housekeeping")
    previous = spark.conf.get(RETENTION_CHECK, "true")
    with stage_run(spark, cfg, run_id, "housekeeping") as stats:
        if hk.vacuum and hk.retain_hours < SAFE_RETAIN_HOURS:
            spark.conf.set(RETENTION_CHECK, "false")
        try:
            tables: dict[str, dict] = {}
            for name in names:
                path = ensure_table(spark, cfg, name)
                table = DeltaTable.forPath(spark, path)
                spark.sparkContext.setJobDescription(f"cso housekeeping {name} ({run_id})")
                out = {"properties_set": _set_properties(spark, table, path, name), "files_before": _files(table)}
                if hk.optimize:
                    out["zorder"] = hk.zorder.get(name, [])
                    out.update(_optimize(table, out["zorder"]))
                if hk.vacuum:
                    out["files_deleted"] = _vacuum(table, hk.retain_hours)
                out["files_after"] = _files(table)
                tables[name] = out
        finally:
            spark.conf.set(RETENTION_CHECK, previous)
        stats["tables"] = tables
        stats["staging_removed"] = clean_staging(cfg)
        stats["rows_in"] = sum(t["files_before"] for t in tables.values())  # files, not rows, for this stage
        stats["rows_out"] = sum(t["files_after"] for t in tables.values())
    return {"run_id": run_id, **stats}
