"""Select the failed trajectories a run will mine: its work set."""

from __future__ import annotations

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from cso_lib.config import Config
from cso_lib.delta_io import merge, new_run_id, read_table, stage_run


def run(cfg: Config, spark: SparkSession) -> dict:
    run_id = cfg.run_id or new_run_id()
    sel = cfg.select
    with stage_run(spark, cfg, run_id, "select") as stats:
        traj = read_table(spark, cfg, "trajectories")
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
