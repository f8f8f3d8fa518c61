"""PRM scores of the policy's own actions (alt_idx = -1), for every step of the work set not yet scored."""

from __future__ import annotations

from contextlib import nullcontext

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StringType, StructField, StructType

from cso_lib.batch_mode import PLANNED, planned_rows, run_batches
from cso_lib.config import Config
from cso_lib.delta_io import merge, read_table, stage_run
from cso_lib.ledger import flush_journal
from cso_lib.llm_models import LLMRole
from cso_lib.messages import iter_states
from cso_lib.models import ScoreRequest, build_models, get_models
from cso_lib.progress import StageProgress
from cso_lib.stages.common import (
    bundles,
    ledger_cache,
    ledger_context,
    map_batches,
    materialize,
    parse_bundle,
    resolve_run_id,
    work_steps,
)

SCORED = StructType(
    [
        StructField("trajectory_id", StringType(), False),
        StructField("step_idx", IntegerType(), False),
        StructField("alt_idx", IntegerType(), False),
        StructField("prm_model", StringType(), False),
        StructField("prompt_version", StringType(), False),
        StructField("score", DoubleType(), True),
        StructField("status", StringType(), False),
        StructField("reasoning", StringType(), True),
    ]
)


def _requests(rows: list[dict]) -> tuple[list[ScoreRequest], list[int]]:
    """The PRM requests of a batch of bundles, trajectory by trajectory, steps in order (prefixes shared back
    to back); todo rows carry step_idx, alt_idx and, for alternatives, the action."""
    import orjson

    requests: list[ScoreRequest] = []
    alt_idxs: list[int] = []
    for row in rows:
        preamble, steps, tools, todo = parse_bundle(row)
        by_step: dict[int, list[dict]] = {}
        for item in todo:
            by_step.setdefault(item["step_idx"], []).append(item)
        for t, state in iter_states(preamble, steps):
            for item in sorted(by_step.get(t, []), key=lambda i: i["alt_idx"]):
                action = steps[t][0] if item["alt_idx"] < 0 else orjson.loads(item["action"])
                requests.append(
                    ScoreRequest(row["trajectory_id"], row["task_id"], row["env"], t, list(state), tools, action=action)
                )
                alt_idxs.append(item["alt_idx"])
    return requests, alt_idxs


def hash_rows(cfg_json: str, rows: list[dict]) -> list[dict]:
    prm = get_models(cfg_json).prm
    requests, _ = _requests(rows)
    return [{"trajectory_id": r.trajectory_id, "request_hash": h}
            for r, hashes in zip(requests, prm.all_hashes(requests), strict=True) for h in hashes]


def score_rows(cfg_json: str, stage: str, run_id: str, rows: list[dict]) -> list[dict]:
    prm = get_models(cfg_json).prm
    requests, alt_idxs = _requests(rows)
    batch = isinstance(prm, LLMRole) and prm.mc.batch  # batch mode: answers come from the ledger, none sent
    ctx = ledger_context(cfg_json, stage, run_id, rows, defer=batch) if prm.records_calls else None
    try:
        scores = prm.score(requests, ctx)
    finally:
        if ctx is not None and ctx.journal is not None:
            ctx.journal.close()
    return [
        {
            "trajectory_id": r.trajectory_id,
            "step_idx": r.step_idx,
            "alt_idx": a,
            "prm_model": prm.name,
            "prompt_version": prm.prompt_version,
            "score": s.score,
            "status": s.status,
            "reasoning": s.reasoning,
        }
        for r, a, s in zip(requests, alt_idxs, scores, strict=True)
    ]


def plan_rows(cfg_json: str, stage: str, run_id: str, rows: list[dict]) -> list[dict]:
    """Batch mode: the PRM requests the executor pass would send now, after the ledger join (none sent)."""
    prm = get_models(cfg_json).prm
    requests, _ = _requests(rows)
    ctx = ledger_context(cfg_json, stage, run_id, rows, defer=True)
    prm.score(requests, ctx)
    return planned_rows(ctx, prm.client.provider)


def write_scores(spark: SparkSession, cfg: Config, run_id: str, todo: DataFrame, stats: dict, stage: str) -> None:
    cfg_json = cfg.model_dump_json()
    bundled = bundles(spark, cfg, run_id, todo)
    prm = build_models(cfg).prm
    llm = isinstance(prm, LLMRole)
    if llm:  # the join before dispatch
        stats["ledger_rows_recovered"] = flush_journal(spark, cfg)  # answers a crashed run already paid for
        if prm.mc.batch:  # the missing requests go out as provider batches from here, then land in the ledger
            def plan() -> DataFrame:
                cached = ledger_cache(spark, cfg, bundled, lambda rows: hash_rows(cfg_json, rows))
                return map_batches(bundles(spark, cfg, run_id, todo, extra=cached),
                                   lambda rows: plan_rows(cfg_json, stage, run_id, rows), PLANNED)

            stats.update(run_batches(spark, cfg, stage=stage, run_id=run_id, role=prm, plan=plan))
        cached = ledger_cache(spark, cfg, bundled, lambda rows: hash_rows(cfg_json, rows))
        bundled = bundles(spark, cfg, run_id, todo, extra=cached)
    out = map_batches(bundled, lambda rows: score_rows(cfg_json, stage, run_id, rows), SCORED)
    try:
        # the model calls happen here, exactly once; the MERGE reads the materialized rows
        with StageProgress(cfg.journal_path, stage) if llm else nullcontext():
            out = materialize(out.withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))
        stats["rows_out"] = out.count()
        stats["unscored"] = out.where(F.col("status") != "ok").count()
        merge(spark, cfg, "prm_scores", out)
    finally:
        stats["ledger_rows"] = flush_journal(spark, cfg)


def run(cfg: Config, spark: SparkSession) -> dict:
    run_id = resolve_run_id(spark, cfg)
    prm_name = build_models(cfg).prm.name
    with stage_run(spark, cfg, run_id, "score_policy") as stats:
        done = (
            read_table(spark, cfg, "prm_scores")
            .where((F.col("alt_idx") == -1) & (F.col("prm_model") == prm_name))
            .select("trajectory_id", "step_idx")
        )
        steps = work_steps(spark, cfg, run_id).select("trajectory_id", "step_idx")
        todo = steps.join(done, ["trajectory_id", "step_idx"], "left_anti").withColumn("alt_idx", F.lit(-1))
        stats["rows_in"] = steps.count()
        write_scores(spark, cfg, run_id, todo, stats, "score_policy")
    return {"run_id": run_id, **stats}
