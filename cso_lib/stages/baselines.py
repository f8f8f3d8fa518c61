"""Baseline datasets for A/B against CSO, from the same tables: Step-DPO, ETO trajectory pairs, RFT.

Written as Parquet next to the pairs, one folder per baseline, rewritten per round (reruns give the same
files):

    <warehouse>/baselines/step_dpo/round=<r>/   PRM-ranked step pairs, no verification (DPO_PAIRS columns)
    <warehouse>/baselines/eto/round=<r>/        success vs failure of the same task, whole conversations
    <warehouse>/baselines/rft/round=<r>/        successful trajectories as SFT `messages`

Definitions in cso_lib.baselines. Inputs: the round's `trajectories` and `steps`; for Step-DPO the
configured PRM's `prm_scores` and expert's `expert_alternatives`; for ETO also the configured policy's
successful `branch_rollouts`. Conversations are rebuilt per trajectory inside executors.
"""

from __future__ import annotations

from typing import Any

import orjson
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StringType, StructField, StructType

from cso_lib import baselines
from cso_lib.config import Config
from cso_lib.delta_io import new_run_id, read_table, stage_run
from cso_lib.messages import Message, Step, to_struct
from cso_lib.models import build_models
from cso_lib.stages.common import map_batches, parse_bundle, steps_json, write_round_parquet
from schemas.tables import DPO_PAIRS, MESSAGES

ETO = StructType(
    [
        StructField("prompt", MESSAGES, nullable=False),
        StructField("chosen", MESSAGES, nullable=False),
        StructField("rejected", MESSAGES, nullable=False),
        StructField("tools", StringType(), nullable=True),
        StructField("task_id", StringType(), nullable=False),
        StructField("env", StringType(), nullable=False),
        StructField("source", StringType(), nullable=False),  # logged | branch_rollout
        StructField("chosen_trajectory_id", StringType(), nullable=False),  # = rejected's for branch_rollout
        StructField("rejected_trajectory_id", StringType(), nullable=False),
        StructField("branch_step_idx", IntegerType(), nullable=True),
        StructField("branch_alt_idx", IntegerType(), nullable=True),
        StructField("chosen_reward", DoubleType(), nullable=True),  # logged reward; null for branch rollouts
        StructField("rejected_reward", DoubleType(), nullable=True),
        StructField("policy_version", StringType(), nullable=False),
        StructField("run_id", StringType(), nullable=False),
        StructField("round", IntegerType(), nullable=False),
    ]
)

RFT = StructType(
    [
        StructField("messages", MESSAGES, nullable=False),
        StructField("tools", StringType(), nullable=True),
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("task_id", StringType(), nullable=False),
        StructField("env", StringType(), nullable=False),
        StructField("reward", DoubleType(), nullable=True),
        StructField("n_steps", IntegerType(), nullable=False),
        StructField("policy_version", StringType(), nullable=False),
        StructField("run_id", StringType(), nullable=False),
        StructField("round", IntegerType(), nullable=False),
    ]
)

_CONV = ["trajectory_id", "task_id", "env", "outcome", "reward", "n_steps", "tools", "preamble", "policy_version",
         "round"]


def baselines_path(cfg: Config, name: str) -> str:
    return f"{cfg.storage.table('baselines')}/{name}"


def _structs(messages: list[Message]) -> list[dict[str, Any]]:
    return [to_struct(m) for m in messages]


def _steps(steps_json: str | None) -> list[Step]:
    return [(orjson.loads(s["action"]), orjson.loads(s["observations"])) for s in orjson.loads(steps_json or "[]")]


def conversations(spark: SparkSession, cfg: Config) -> DataFrame:
    """The round's trajectories with their steps as one JSON array (`steps_json`), one row each."""
    traj = read_table(spark, cfg, "trajectories").where(F.col("round") == cfg.round).select(*_CONV)
    return traj.join(steps_json(spark, cfg, traj), "trajectory_id", "left")


# ---- Step-DPO ------------------------------------------------------------------------------------------
def step_dpo_rows(run_id: str, margin: float, rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        preamble, steps, _, todo = parse_bundle(row)
        scores = [{**s, "action": orjson.loads(s["action"]) if s.get("action") else None} for s in todo]
        for p in baselines.step_dpo_pairs(preamble, steps, scores, margin):
            out.append(
                {
                    **p,
                    "prompt": _structs(p["prompt"]),
                    "chosen": _structs(p["chosen"]),
                    "rejected": _structs(p["rejected"]),
                    "tools": row["tools"],
                    "trajectory_id": row["trajectory_id"],
                    "task_id": row["task_id"],
                    "verified": False,
                    "verifier": "none",
                    "policy_version": row["policy_version"],
                    "run_id": run_id,
                    "round": row["round"],
                }
            )
    return out


def step_dpo(spark: SparkSession, cfg: Config, convs: DataFrame, run_id: str, margin: float = 0.0) -> DataFrame:
    models = build_models(cfg)
    keys = ["trajectory_id", "step_idx", "alt_idx"]
    scores = (
        read_table(spark, cfg, "prm_scores")
        .where((F.col("prm_model") == models.prm.name) & (F.col("status") == "ok"))
        .join(convs.select("trajectory_id"), "trajectory_id", "left_semi")
        .select(*keys, "score")
    )
    alts = read_table(spark, cfg, "expert_alternatives").where(F.col("expert_model") == models.expert.name)
    todo = scores.join(alts.select(*keys, "action"), keys, "left").where(
        (F.col("alt_idx") < 0) | F.col("action").isNotNull())
    todo_g = todo.groupBy("trajectory_id").agg(
        F.to_json(F.collect_list(F.struct("step_idx", "alt_idx", "score", "action"))).alias("todo_json"))
    bundles = convs.join(todo_g, "trajectory_id").repartition(max(1, cfg.spark.shuffle_partitions), "trajectory_id")
    return map_batches(bundles, lambda rows: step_dpo_rows(run_id, margin, rows), DPO_PAIRS)


# ---- ETO -------------------------------------------------------------------------------------------
def eto_rows(run_id: str, rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        preamble, steps = orjson.loads(row["preamble"]), _steps(row["steps_json"])
        rejected = baselines.conversation(preamble, steps)
        if row["source"] == "logged":
            chosen = baselines.conversation(orjson.loads(row["c_preamble"]), _steps(row["c_steps_json"]))
        else:
            chosen = baselines.branch_conversation(preamble, steps, row["branch_step_idx"],
                                                   orjson.loads(row["continuation"]))
        pair = baselines.eto_pair(chosen, rejected)
        if pair is None:
            continue
        out.append(
            {
                **{k: _structs(v) for k, v in pair.items()},
                "tools": row["tools"],
                "task_id": row["task_id"],
                "env": row["env"],
                "source": row["source"],
                "chosen_trajectory_id": row["c_trajectory_id"] or row["trajectory_id"],
                "rejected_trajectory_id": row["trajectory_id"],
                "branch_step_idx": row["branch_step_idx"],
                "branch_alt_idx": row["branch_alt_idx"],
                "chosen_reward": row["c_reward"],
                "rejected_reward": row["reward"],
                "policy_version": row["policy_version"],
                "run_id": run_id,
                "round": row["round"],
            }
        )
    return out


def eto(spark: SparkSession, cfg: Config, convs: DataFrame, run_id: str) -> DataFrame:
    """One logged pair per failed trajectory whose task has a success in the round (the best success:
    highest reward, then fewest steps, then lowest id), and one branch pair per failed trajectory with a
    successful branch rollout (the earliest: lowest step, alternative, rollout)."""
    failed = convs.where(F.col("outcome") == 0)
    by_task = Window.partitionBy("task_id", "env").orderBy(F.desc("reward"), "n_steps", "trajectory_id")
    best = (
        convs.where(F.col("outcome") == 1)
        .withColumn("_rank", F.row_number().over(by_task))
        .where(F.col("_rank") == 1)
        .select("task_id", "env", *[F.col(c).alias(f"c_{c}") for c in ("trajectory_id", "reward", "preamble",
                                                                        "steps_json")])
    )
    none = lambda t: F.lit(None).cast(t)  # noqa: E731
    logged = failed.join(best, ["task_id", "env"]).select(
        *failed.columns, *[f"c_{c}" for c in ("trajectory_id", "reward", "preamble", "steps_json")],
        F.lit("logged").alias("source"), none("int").alias("branch_step_idx"),
        none("int").alias("branch_alt_idx"), none("string").alias("continuation"))
    policy = build_models(cfg).policy.name
    by_traj = Window.partitionBy("trajectory_id").orderBy("step_idx", "alt_idx", "rollout_idx")
    wins = (
        read_table(spark, cfg, "branch_rollouts")
        .where((F.col("policy_model") == policy) & F.col("success"))
        .withColumn("_rank", F.row_number().over(by_traj))
        .where(F.col("_rank") == 1)
        .select("trajectory_id", F.col("step_idx").alias("branch_step_idx"),
                F.col("alt_idx").alias("branch_alt_idx"), "continuation")
    )
    branch = failed.join(wins, "trajectory_id").select(
        *failed.columns, none("string").alias("c_trajectory_id"), none("double").alias("c_reward"),
        none("string").alias("c_preamble"), none("string").alias("c_steps_json"),
        F.lit("branch_rollout").alias("source"), "branch_step_idx", "branch_alt_idx", "continuation")
    todo = logged.unionByName(branch).repartition(max(1, cfg.spark.shuffle_partitions), "trajectory_id")
    return map_batches(todo, lambda rows: eto_rows(run_id, rows), ETO)


# ---- RFT -------------------------------------------------------------------------------------------
def rft_rows(run_id: str, rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        record = baselines.rft_record(orjson.loads(row["preamble"]), _steps(row["steps_json"]))
        out.append({"messages": _structs(record["messages"]), "run_id": run_id,
                    **{k: row[k] for k in ("tools", "trajectory_id", "task_id", "env", "reward", "n_steps",
                                           "policy_version", "round")}})
    return out


def rft(convs: DataFrame, run_id: str) -> DataFrame:
    return map_batches(convs.where(F.col("outcome") == 1), lambda rows: rft_rows(run_id, rows), RFT)


# ---- the stage -----------------------------------------------------------------------------------------


def run(cfg: Config, spark: SparkSession, margin: float = 0.0) -> dict:
    """Write the three baseline datasets of round `cfg.round`; returns their record counts."""
    run_id = cfg.run_id or new_run_id("baselines")
    with stage_run(spark, cfg, run_id, "baselines") as stats:
        convs = conversations(spark, cfg).persist()
        stats["rows_in"] = convs.count()
        stats["step_dpo_pairs"] = write_round_parquet(step_dpo(spark, cfg, convs, run_id, margin), baselines_path(cfg, "step_dpo"),
                                         ["trajectory_id", "step_idx"])
        eto_df = eto(spark, cfg, convs, run_id).persist()
        stats["eto_pairs"] = write_round_parquet(eto_df, baselines_path(cfg, "eto"), ["rejected_trajectory_id", "source"])
        stats["eto_pairs_by_source"] = {r["source"]: r["count"] for r in eto_df.groupBy("source").count().collect()}
        eto_df.unpersist()
        stats["rft_records"] = write_round_parquet(rft(convs, run_id), baselines_path(cfg, "rft"), ["trajectory_id"])
        stats["rows_out"] = stats["step_dpo_pairs"] + stats["eto_pairs"] + stats["rft_records"]
        convs.unpersist()
    return {"run_id": run_id, **stats}
