"""Select the failed trajectories a run will mine: its work set.

Every select records in `runs` (details) the Delta version of `trajectories` it read (`trajectories_version`).
With `select.incremental` a run reads only what arrived after the last *successful* run: the trajectories
committed in versions (since, upto], where `since` is the highest version recorded by a run the pipeline
finished (a `pipeline` row in `runs`), read from Delta's Change Data Feed. A failed run never moves the mark, so the
next run takes its trajectories again; a rerun of the same run id reuses the range it recorded, so its work
set does not change. The later stages read only the run's work set.
"""

from __future__ import annotations

import logging

from delta.tables import DeltaTable
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cso_lib.config import Config
from cso_lib.delta_io import ensure_table, merge, new_run_id, read_table, stage_run
from cso_lib.errors import StageError

log = logging.getLogger("cso")

FINAL_STAGE = "pipeline"  # a run is successful once the pipeline recorded its end in `runs`


def table_version(spark: SparkSession, path: str) -> int:
    """The latest committed version of the Delta table at `path`."""
    return DeltaTable.forPath(spark, path).history(1).select("version").first()["version"]


def _recorded(spark: SparkSession, cfg: Config) -> DataFrame:
    """(run_id, since, upto) of every finished select, from `runs.details`."""
    return (
        read_table(spark, cfg, "runs")
        .where(F.col("stage") == "select")
        .select(
            "run_id",
            "started_at",
            F.get_json_object("details", "$.since_version").cast("long").alias("since"),
            F.get_json_object("details", "$.trajectories_version").cast("long").alias("upto"),
        )
        .where(F.col("upto").isNotNull())
    )


def version_range(spark: SparkSession, cfg: Config, run_id: str) -> tuple[int | None, int]:
    """(since, upto): the versions of `trajectories` an incremental run covers, `since` exclusive (None: all).

    A run id that already finished its select keeps its recorded range; otherwise `since` is the high-water
    mark of the last successful run and `upto` the table's current version.
    """
    recorded = _recorded(spark, cfg)
    own = recorded.where(F.col("run_id") == run_id).orderBy("started_at").first()
    if own is not None:
        return own["since"], own["upto"]
    done = read_table(spark, cfg, "runs").where(F.col("stage") == FINAL_STAGE).select("run_id")
    mark = recorded.join(done, "run_id", "left_semi").agg(F.max("upto").alias("v")).first()["v"]
    return mark, table_version(spark, ensure_table(spark, cfg, "trajectories"))


def arrived(spark: SparkSession, path: str, since: int | None, upto: int) -> DataFrame:
    """Rows of the insert-only Delta table at `path` committed in versions (since, upto].

    Read from the Change Data Feed; where the feed does not cover the range (a table created before it was
    enabled), from the difference of the two snapshots. Both need the files of those versions, so VACUUM
    retention must exceed the time between runs (see `housekeeping.retain_hours`).
    """
    at = spark.read.format("delta").option("versionAsOf", upto).load(path)
    if since is None:
        return at
    if since >= upto:
        return at.limit(0)
    try:
        cdf = (
            spark.read.format("delta")
            .option("readChangeFeed", "true")
            .option("startingVersion", since + 1)
            .option("endingVersion", upto)
            .load(path)
        )
        cdf.select("_commit_version").limit(1).collect()  # the range is checked when the feed is read
        return cdf.where(F.col("_change_type") == "insert").drop("_change_type", "_commit_version", "_commit_timestamp")
    except AnalysisException as e:
        log.warning("change data feed of %s unavailable for versions %d..%d (%s); diffing snapshots instead",
                    path, since + 1, upto, str(e).splitlines()[0])
    try:
        before = spark.read.format("delta").option("versionAsOf", since).load(path).select("trajectory_id")
        return at.join(before, "trajectory_id", "left_anti")
    except AnalysisException as e:
        raise StageError(
            f"cannot read trajectories committed after version {since} of {path!r}: neither the change data "
            f"feed nor version {since} is available (vacuumed?). Run once with select.incremental=false. ({e})"
        ) from e


def run(cfg: Config, spark: SparkSession) -> dict:
    run_id = cfg.run_id or new_run_id()
    sel = cfg.select
    with stage_run(spark, cfg, run_id, "select") as stats:
        since, upto = version_range(spark, cfg, run_id) if sel.incremental else (None, None)
        if upto is None:
            upto = table_version(spark, ensure_table(spark, cfg, "trajectories"))
        stats["incremental"] = sel.incremental
        stats["since_version"], stats["trajectories_version"] = since, upto
        traj = arrived(spark, cfg.storage.table("trajectories"), since, upto)
        df = traj.where(F.col("outcome") == sel.outcome)
        if sel.round is not None:
            df = df.where(F.col("round") == sel.round)
        if sel.policy_version is not None:
            df = df.where(F.col("policy_version") == sel.policy_version)
        if sel.env is not None:
            df = df.where(F.col("env") == sel.env)
        if sel.sample_fraction < 1.0:
            # A seeded hash sample: the same trajectories for the same seed, whatever the partitioning.
            bucket = F.abs(F.xxhash64("trajectory_id", F.lit(sel.seed))) % 1_000_000
            df = df.where(bucket < int(sel.sample_fraction * 1_000_000))
        if sel.limit is not None:
            df = df.orderBy("trajectory_id").limit(sel.limit)
        rows = df.select(
            F.lit(run_id).alias("run_id"), "trajectory_id", F.col("round"), F.current_timestamp().alias("selected_at")
        )
        merge(spark, cfg, "work_set", rows)
        stats["rows_in"] = traj.count()
        stats["selected"] = stats["rows_out"] = (
            read_table(spark, cfg, "work_set").where(F.col("run_id") == run_id).count()
        )
    cfg.run_id = run_id
    return {"run_id": run_id, **stats}
