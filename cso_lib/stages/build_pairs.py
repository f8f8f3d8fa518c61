"""Verified (state, chosen, rejected) pairs: the `critical_steps` Delta table and the `dpo_pairs/` Parquet.

With verification (the default) a pair is an alternative whose branch rollouts reached the ground truth
at least once. With `cso.verify=false` (the paper's "w/o verification" ablation) every high-scoring
alternative of a candidate becomes a pair unverified; those land in `dpo_pairs_unverified/`.
`dpo_pairs/round=<r>/` holds TRL conversational preference records (prompt, chosen, rejected message
lists, tool calls kept) plus provenance; it is rewritten from `critical_steps` for the round, so reruns
give the same files.
"""

from __future__ import annotations

import orjson
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, IntegerType, StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_io import merge, read_table, stage_run
from cso_lib.messages import state_at
from cso_lib.models import build_models, get_models
from cso_lib.stages.common import (
    bundles,
    dumps,
    map_batches,
    materialize,
    parse_bundle,
    resolve_run_id,
    work_steps,
)
from schemas.tables import MESSAGES

# Filled later by the `taxonomy` stage (verified rows only).
TAXONOMY_COLUMNS = ("error_category", "taxonomy_status", "taxonomy_reasoning", "taxonomy_model",
                    "taxonomy_prompt_version")

BUILT = StructType(
    [
        StructField("trajectory_id", StringType(), False),
        StructField("step_idx", IntegerType(), False),
        StructField("alt_idx", IntegerType(), False),
        StructField("prompt", StringType(), False),
        StructField("rejected", StringType(), False),
        StructField("sim_true_fix", BooleanType(), True),
    ]
)


def pair_rows(cfg_json: str, rows: list[dict]) -> list[dict]:
    world = get_models(cfg_json).world
    out = []
    for row in rows:
        preamble, steps, _, todo = parse_bundle(row)
        for item in todo:
            t = item["step_idx"]
            state, rejected = state_at(preamble, steps, t), steps[t][0]
            truth = None
            if row["env"] == "sim" and world is not None:
                task = world.task(row["task_id"])
                chosen = orjson.loads(item["chosen"])
                truth = not world.is_correct(task, state, rejected) and world.is_correct(task, state, chosen)
            out.append(dict(trajectory_id=row["trajectory_id"], step_idx=t, alt_idx=item["alt_idx"],
                            prompt=dumps(state), rejected=dumps(rejected), sim_true_fix=truth))
    return out


def pairs_path(cfg: Config) -> str:
    return cfg.storage.pairs_path if cfg.cso.verify else cfg.storage.pairs_path.rstrip("/") + "_unverified"


def run(cfg: Config, spark: SparkSession) -> dict:
    run_id = resolve_run_id(spark, cfg)
    models = build_models(cfg)
    with stage_run(spark, cfg, run_id, "build_pairs") as stats:
        steps = work_steps(spark, cfg, run_id).select("trajectory_id", "step_idx")
        cands = (
            read_table(spark, cfg, "critical_candidates")
            .where("is_candidate")
            .join(steps, ["trajectory_id", "step_idx"], "left_semi")
        )
        keys = ["trajectory_id", "step_idx", "alt_idx"]
        if cfg.cso.verify:
            counted = (
                read_table(spark, cfg, "branch_rollouts")
                .where((F.col("policy_model") == models.policy.name) & ~F.col("status").isin("skipped", "error"))
                .join(cands.select("trajectory_id", "step_idx"), ["trajectory_id", "step_idx"], "left_semi")
                .groupBy(*keys)
                .agg(F.count("*").alias("rollouts"), F.sum(F.col("success").cast("int")).alias("successes"),
                     F.array_join(F.array_sort(F.collect_set("verifier")), "+").alias("verifier"))
            )
            # alt_idx -1: re-rollouts of the original action (cso.original_rollouts); flip = rate(alt) - rate(orig)
            original = counted.where(F.col("alt_idx") == -1).select(
                "trajectory_id", "step_idx", F.col("rollouts").alias("original_rollouts"),
                F.col("successes").alias("original_successes"))
            picked = (
                counted.where((F.col("alt_idx") >= 0) & (F.col("successes") > 0))
                .join(original, ["trajectory_id", "step_idx"], "left")
                .select(*keys, "rollouts", "successes", "original_rollouts", "original_successes",
                        (F.col("successes") / F.col("rollouts")
                         - F.col("original_successes") / F.col("original_rollouts")).alias("flip"),
                        F.lit(True).alias("verified"), "verifier")
            )
        else:
            picked = cands.select("trajectory_id", "step_idx", F.explode("high_alt_idxs").alias("alt_idx")).select(
                *keys, F.lit(0).alias("rollouts"), F.lit(0).alias("successes"),
                *[F.lit(None).cast(t).alias(c) for c, t in (("original_rollouts", "int"),
                                                             ("original_successes", "int"), ("flip", "double"))],
                F.lit(False).alias("verified"), F.lit("none").alias("verifier"))
        alts = read_table(spark, cfg, "expert_alternatives").where(F.col("expert_model") == models.expert.name)
        scores = read_table(spark, cfg, "prm_scores").where(F.col("prm_model") == models.prm.name)
        done = read_table(spark, cfg, "critical_steps").where(F.col("verified") == cfg.cso.verify).select(*keys)
        todo = (
            picked.join(done, keys, "left_anti")
            .join(alts.select(*keys, F.col("action").alias("chosen")), keys)
            .join(cands.select("trajectory_id", "step_idx", "r_policy"), ["trajectory_id", "step_idx"])
            .join(scores.select(*keys, F.col("score").alias("r_expert")), keys, "left")
        )
        stats["rows_in"] = todo.count()
        if stats["rows_in"]:
            todo_cols = todo.select(*keys, "chosen")
            cfg_json = cfg.model_dump_json()
            built = map_batches(bundles(spark, cfg, run_id, todo_cols), lambda rows: pair_rows(cfg_json, rows), BUILT)
            traj = read_table(spark, cfg, "trajectories").select(
                "trajectory_id", "task_id", "env", "round", "policy_version", "n_steps", "tools")
            rows = materialize(
                todo.join(built, keys)
                .join(traj, "trajectory_id")
                .select("*", *[F.lit(None).cast("string").alias(c) for c in TAXONOMY_COLUMNS],
                        F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))
            )
            stats["rows_out"] = rows.count()
            merge(spark, cfg, "critical_steps", rows)
        else:
            stats["rows_out"], stats["nothing_to_do"] = 0, True
        # always: a run killed between the MERGE and this rewrite left the Parquet behind the table
        stats["pairs_written"] = write_pairs(spark, cfg)
    return {"run_id": run_id, **stats}


def write_pairs(spark: SparkSession, cfg: Config) -> int:
    """Rewrite dpo_pairs/round=<round> from `critical_steps` (all runs of the round)."""
    cs = read_table(spark, cfg, "critical_steps").where(
        (F.col("round") == cfg.round) & (F.col("verified") == cfg.cso.verify))
    msgs = lambda c: F.from_json(c, MESSAGES)  # noqa: E731
    one = lambda c: F.from_json(F.concat(F.lit("["), c, F.lit("]")), MESSAGES)  # noqa: E731
    pairs = cs.select(
        msgs("prompt").alias("prompt"), one("chosen").alias("chosen"), one("rejected").alias("rejected"), "tools",
        "trajectory_id", "task_id", "step_idx", "alt_idx", "r_policy", "r_expert", "verified", "verifier",
        "policy_version", "run_id", "round",
    ).orderBy("trajectory_id", "step_idx", "alt_idx")
    (pairs.coalesce(1).write.mode("overwrite").option("partitionOverwriteMode", "dynamic")
     .partitionBy("round").parquet(pairs_path(cfg)))
    return cs.count()

