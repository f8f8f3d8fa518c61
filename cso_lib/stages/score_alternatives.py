"""PRM scores of the expert's alternatives, then candidate selection by the paper's rule.

A step is a candidate critical step iff r_policy < gamma_low and max_j r_expert_j > gamma_high. Every
step with a policy score gets a decision row in `critical_candidates`, with the reason, so an analyst can
ask why a step was or was not chosen.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cso_lib.config import Config
from cso_lib.delta_io import merge, read_table, stage_run
from cso_lib.models import build_models
from cso_lib.stages.common import resolve_run_id, work_steps
from cso_lib.stages.score_policy import write_scores

# what a decision is made of; run_id and decided_at say which run made it last
DECISION_COLUMNS = ("r_policy", "max_r_expert", "best_alt_idx", "high_alt_idxs", "is_candidate", "reason", "gamma_low",
                    "gamma_high", "k", "order")


def decide(policy_scores: DataFrame, alt_scores: DataFrame, gamma_low: float, gamma_high: float) -> DataFrame:
    """The paper's rule over (trajectory_id, step_idx, score) of policy actions and
    (trajectory_id, step_idx, alt_idx, score) of alternatives. Pure transform; ties are not candidates."""
    agg = alt_scores.groupBy("trajectory_id", "step_idx").agg(
        F.max("score").alias("max_r_expert"),
        F.max_by("alt_idx", F.struct("score", -F.col("alt_idx"))).alias("best_alt_idx"),
        F.array_sort(F.collect_list(F.when(F.col("score") > gamma_high, F.struct(-F.col("score"), "alt_idx")))).alias(
            "_high"),
    )
    d = policy_scores.select("trajectory_id", "step_idx", F.col("score").alias("r_policy")).join(
        agg, ["trajectory_id", "step_idx"], "left")
    fmt = lambda x: F.format_number(x, 3)  # noqa: E731
    is_cand = (F.col("r_policy") < gamma_low) & (F.col("max_r_expert") > gamma_high)
    reason = (
        F.when(F.col("r_policy").isNull(), F.lit("policy action unscored"))
        .when(F.col("r_policy") >= gamma_low,
              F.concat(F.lit("r_policy "), fmt(F.col("r_policy")), F.lit(f" >= gamma_low {gamma_low}")))
        .when(F.col("max_r_expert").isNull(), F.lit("no scored alternatives"))
        .when(F.col("max_r_expert") <= gamma_high,
              F.concat(F.lit("max r_expert "), fmt(F.col("max_r_expert")), F.lit(f" <= gamma_high {gamma_high}")))
        .otherwise(F.concat(F.lit("r_policy "), fmt(F.col("r_policy")), F.lit(f" < {gamma_low} and max r_expert "),
                            fmt(F.col("max_r_expert")), F.lit(f" > {gamma_high}")))
    )
    return d.select(
        "trajectory_id",
        "step_idx",
        "r_policy",
        "max_r_expert",
        "best_alt_idx",
        F.coalesce(F.transform("_high", lambda x: x["alt_idx"]), F.array().cast("array<int>")).alias("high_alt_idxs"),
        F.coalesce(is_cand, F.lit(False)).alias("is_candidate"),
        reason.alias("reason"),
    )


def run(cfg: Config, spark: SparkSession) -> dict:
    run_id = resolve_run_id(spark, cfg)
    models = build_models(cfg)
    prm_name, expert_name = models.prm.name, models.expert.name
    with stage_run(spark, cfg, run_id, "score_alternatives") as stats:
        steps = work_steps(spark, cfg, run_id).select("trajectory_id", "step_idx")
        alts = (
            read_table(spark, cfg, "expert_alternatives")
            .where((F.col("expert_model") == expert_name) & (F.col("alt_idx") < cfg.cso.k))
            .join(steps, ["trajectory_id", "step_idx"], "left_semi")
            .select("trajectory_id", "step_idx", "alt_idx", "action")
        )
        scores = read_table(spark, cfg, "prm_scores").where(F.col("prm_model") == prm_name)
        todo = alts.join(scores.where(F.col("alt_idx") >= 0), ["trajectory_id", "step_idx", "alt_idx"], "left_anti")
        stats["rows_in"] = alts.count()
        write_scores(spark, cfg, run_id, todo, stats, "score_alternatives")

        scores = read_table(spark, cfg, "prm_scores").where(F.col("prm_model") == prm_name)
        policy_scores = scores.where(F.col("alt_idx") == -1).join(steps, ["trajectory_id", "step_idx"], "left_semi")
        alt_scores = scores.where(F.col("status") == "ok").join(
            alts.select("trajectory_id", "step_idx", "alt_idx"), ["trajectory_id", "step_idx", "alt_idx"], "left_semi")
        # use_prm=false (the 'w/o PRM' ablation): thresholds no score can fail, so every scored step with an
        # alternative is a candidate and every alternative is rolled out; verification alone decides.
        low, high = (cfg.cso.gamma_low, cfg.cso.gamma_high) if cfg.cso.use_prm else (2.0, -1.0)
        decisions = decide(policy_scores, alt_scores, low, high).select(
            "*",
            F.lit(low).alias("gamma_low"),
            F.lit(high).alias("gamma_high"),
            F.lit(cfg.cso.k).alias("k"),
            F.lit(cfg.cso.order).alias("order"),
            F.lit(run_id).alias("run_id"),
            F.current_timestamp().alias("decided_at"),
        )
        # only new or changed decisions (new scores, other thresholds) go into the MERGE: Delta rewrites every file
        # holding a matched row even when an update condition leaves the row as it was, so a rerun writes nothing
        stored = read_table(spark, cfg, "critical_candidates").select("trajectory_id", "step_idx", *DECISION_COLUMNS)
        same = " AND ".join(f"s.`{c}` <=> t.`{c}`" for c in ("trajectory_id", "step_idx", *DECISION_COLUMNS))
        fresh = decisions.alias("s").join(stored.alias("t"), F.expr(same), "left_anti")
        merge(spark, cfg, "critical_candidates", fresh, update=True)
        stats["candidates"] = (
            read_table(spark, cfg, "critical_candidates")
            .join(steps, ["trajectory_id", "step_idx"], "left_semi")
            .where("is_candidate")
            .count()
        )
    return {"run_id": run_id, **stats}
