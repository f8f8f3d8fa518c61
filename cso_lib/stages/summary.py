"""The end-of-run summary: rows per table, supervision, candidates, pairs, and (simulation) precision/recall.

Precision: the share of pairs whose chosen alternative really fixes the step (the policy's action was
wrong and the alternative is the world's correct action). Recall: the share of true critical steps (real
mistakes of the policy in the run's failed trajectories) that got at least one such pair. Both need the
truth, so they are computed only for trajectories of the simulation world.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_io import read_table
from cso_lib.messages import iter_states
from cso_lib.models import get_models
from cso_lib.stages.common import (
    bundles,
    map_batches,
    parse_bundle,
    resolve_run_id,
    work_steps,
    work_trajectories,
)
from schemas.tables import TABLES

TRUTH = StructType([StructField("trajectory_id", StringType(), False), StructField("step_idx", IntegerType(), False)])


def critical_truth(cfg_json: str, rows: list[dict]) -> list[dict]:
    world = get_models(cfg_json).world
    out = []
    for row in rows:
        preamble, steps, _, _ = parse_bundle(row)
        task = world.task(row["task_id"])
        for t, state in iter_states(preamble, steps):
            if world.is_critical(task, state, steps[t][0]):
                out.append({"trajectory_id": row["trajectory_id"], "step_idx": t})
    return out


def compute(cfg: Config, spark: SparkSession) -> dict:
    run_id = resolve_run_id(spark, cfg)
    steps = work_steps(spark, cfg, run_id).select("trajectory_id", "step_idx").persist()
    n_steps = steps.count()
    cands = read_table(spark, cfg, "critical_candidates").join(steps, ["trajectory_id", "step_idx"], "left_semi")
    pairs = (
        read_table(spark, cfg, "critical_steps")
        .where(F.col("verified") == cfg.cso.verify)
        .join(steps, ["trajectory_id", "step_idx"], "left_semi")
        .persist()
    )
    rollouts = read_table(spark, cfg, "branch_rollouts").join(steps, ["trajectory_id", "step_idx"], "left_semi")
    r = rollouts.agg(F.count("*").alias("n"), F.count_if("success").alias("successes")).first()
    p = pairs.agg(
        F.count("*").alias("n"),
        F.count_distinct("trajectory_id", "step_idx").alias("supervised"),
        F.count_if(F.col("env") == "sim").alias("sim"),
        F.count_if((F.col("env") == "sim") & F.col("sim_true_fix")).alias("sim_true_fix"),
    ).first()
    supervised = p["supervised"]
    with ThreadPoolExecutor(max_workers=4) as pool:  # small tables: the driver's planning dominates each count
        table_counts = dict(zip(TABLES, pool.map(lambda name: read_table(spark, cfg, name).count(), TABLES),
                                strict=True))
    out = {
        "run_id": run_id,
        "verify": cfg.cso.verify,
        "order": cfg.cso.order,
        "tables": table_counts,
        "trajectories": steps.select("trajectory_id").distinct().count(),
        "steps": n_steps,
        "candidates": cands.where("is_candidate").count(),
        "rollouts": r["n"],
        "rollout_successes": r["successes"],
        "pairs": p["n"],
        "steps_supervised": supervised,
        "share_steps_supervised": supervised / n_steps if n_steps else 0.0,
    }
    sim_pairs = pairs.where(F.col("env") == "sim")
    if work_trajectories(spark, cfg, run_id).where(F.col("env") == "sim").limit(1).count():
        n_sim = p["sim"]
        out["precision"] = (p["sim_true_fix"] / n_sim) if n_sim else None
        sim_steps = steps.join(
            read_table(spark, cfg, "trajectories").where(F.col("env") == "sim").select("trajectory_id"),
            "trajectory_id", "left_semi").withColumn("todo", F.lit(1))
        cfg_json = cfg.model_dump_json()
        truth = map_batches(bundles(spark, cfg, run_id, sim_steps.select("trajectory_id", "todo").distinct()),
                            lambda rows: critical_truth(cfg_json, rows), TRUTH).persist()
        n_true = truth.count()
        found = truth.join(sim_pairs.where("sim_true_fix"), ["trajectory_id", "step_idx"], "left_semi").count()
        out["true_critical_steps"] = n_true
        out["recall"] = found / n_true if n_true else None
        truth.unpersist()
    steps.unpersist()
    pairs.unpersist()
    return out


def render(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cso run {summary['run_id']} ({'verified' if summary['verify'] else 'NOT verified'} pairs)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key in ("tables", "run_id"):
            continue
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    for name, count in summary["tables"].items():
        table.add_row(f"rows in {name}", str(count))
    Console().print(table)
