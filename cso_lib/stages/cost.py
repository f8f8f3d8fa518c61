"""`cso cost`: what the model calls cost so far, by stage and model, and what the remaining work will cost.

Spent: sums over the `llm_calls` ledger (every distinct request once; cached tokens shown apart). Remaining:
the work each model stage still has for the run (the same anti-joins the stages use), times that stage's
average cost and tokens per call so far (at the list price, halved when the stage's role is in batch mode);
no average yet means no projection, never a guess.
"""

from __future__ import annotations

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from cso_lib.config import Config
from cso_lib.delta_io import read_table
from cso_lib.errors import StageError
from cso_lib.llm import BATCH_DISCOUNT
from cso_lib.models import build_models
from cso_lib.stages.common import resolve_run_id, work_steps


def remaining_work(spark: SparkSession, cfg: Config, run_id: str) -> dict[str, int]:
    """Requests each model stage still has to make for the run (first attempts)."""
    models = build_models(cfg)
    steps = work_steps(spark, cfg, run_id).select("trajectory_id", "step_idx")
    scores = read_table(spark, cfg, "prm_scores").where(F.col("prm_model") == models.prm.name)
    policy_scored = scores.where("alt_idx = -1").select("trajectory_id", "step_idx")
    alts = read_table(spark, cfg, "expert_alternatives").where(F.col("expert_model") == models.expert.name)
    asked = alts.select("trajectory_id", "step_idx").distinct()
    low = scores.where((F.col("alt_idx") == -1) & (F.col("score") < cfg.cso.gamma_low)).select(
        "trajectory_id", "step_idx")
    unscored_policy = steps.join(policy_scored, ["trajectory_id", "step_idx"], "left_anti").count()
    to_ask = steps if cfg.cso.order == "paper" else low.join(steps, ["trajectory_id", "step_idx"], "left_semi")
    unasked = to_ask.join(asked, ["trajectory_id", "step_idx"], "left_anti").count()
    if cfg.cso.order == "prm_first":
        unasked += round(unscored_policy * _share_low(spark, cfg, low, policy_scored))
    unscored_alts = alts.join(steps, ["trajectory_id", "step_idx"], "left_semi").join(
        scores.where("alt_idx >= 0"), ["trajectory_id", "step_idx", "alt_idx"], "left_anti").count()
    # taxonomy: the verified pairs found so far that the judge has not classified (future pairs are not projected)
    unclassified = read_table(spark, cfg, "critical_steps").where(
        F.col("verified") & ~F.coalesce(F.col("taxonomy_model") == models.judge.name, F.lit(False))
    ).join(steps, ["trajectory_id", "step_idx"], "left_semi").count()
    return {"score_policy": unscored_policy, "propose": unasked,
            "score_alternatives": unscored_alts + unasked * cfg.cso.k, "taxonomy": unclassified}


def _share_low(spark: SparkSession, cfg: Config, low, scored) -> float:
    n = scored.count()
    return low.count() / n if n else 1.0


def report(cfg: Config, spark: SparkSession) -> dict:
    calls = read_table(spark, cfg, "llm_calls")
    by = (
        calls.groupBy("stage", "model")
        .agg(
            F.count("*").alias("calls"),
            F.sum(F.col("status").eqNullSafe("ok").cast("int")).alias("ok"),
            F.sum("input_tokens").alias("input_tokens"),
            F.sum("cached_input_tokens").alias("cached_input_tokens"),
            F.sum("output_tokens").alias("output_tokens"),
            F.sum("cost_usd").alias("cost_usd"),
            # what the calls would have cost online (batch answers are billed at BATCH_DISCOUNT)
            F.sum(F.when(F.col("batch"), F.col("cost_usd") / BATCH_DISCOUNT).otherwise(F.col("cost_usd"))).alias(
                "list_cost_usd"),
            F.sum(F.col("batch").cast("int")).alias("batch_calls"),
            F.sum(F.col("cost_usd").isNull().cast("int")).alias("unpriced"),
        )
        .orderBy("stage", "model")
    )
    spent = [r.asDict() for r in by.collect()]
    try:
        run_id = resolve_run_id(spark, cfg)
    except StageError:
        return {"spent": spent, "remaining": {}}
    todo = remaining_work(spark, cfg, run_id)
    roles = {"score_policy": cfg.prm, "score_alternatives": cfg.prm, "propose": cfg.expert,
             "taxonomy": cfg.judge or cfg.prm}
    remaining = {}
    for stage, n in todo.items():
        rows = [r for r in spent if r["stage"] == stage]
        calls_done = sum(r["calls"] for r in rows)
        # at the list price per call so far, discounted when the stage's role now runs in batch mode
        cost = sum(r["list_cost_usd"] or 0.0 for r in rows) * (BATCH_DISCOUNT if roles[stage].batch else 1.0)
        tokens = sum((r["input_tokens"] or 0) + (r["output_tokens"] or 0) for r in rows)
        remaining[stage] = {
            "requests": n,
            "projected_cost_usd": (cost / calls_done * n) if calls_done and cost else None,
            "projected_tokens": round(tokens / calls_done * n) if calls_done else None,
        }
    return {"run_id": run_id, "spent": spent, "remaining": remaining}


def render(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="model calls so far (llm_calls)")
    for col in ("stage", "model", "calls", "ok", "input", "cached", "output", "USD"):
        t.add_column(col, justify="right" if col not in ("stage", "model") else "left")
    for r in rep["spent"]:
        usd = "unpriced" if r["cost_usd"] is None else f"{r['cost_usd']:.4f}"
        t.add_row(r["stage"], r["model"], str(r["calls"]), str(r["ok"]), str(r["input_tokens"]),
                  str(r["cached_input_tokens"]), str(r["output_tokens"]), usd)
    Console().print(t)
    if rep.get("remaining"):
        t = Table(title=f"remaining work of run {rep['run_id']}")
        for col in ("stage", "requests", "projected tokens", "projected USD"):
            t.add_column(col)
        for stage, r in rep["remaining"].items():
            usd = "n/a" if r["projected_cost_usd"] is None else f"{r['projected_cost_usd']:.4f}"
            t.add_row(stage, str(r["requests"]), str(r["projected_tokens"] or "n/a"), usd)
        Console().print(t)
