"""PRM scores of the policy's own actions (alt_idx = -1), for every step of the work set not yet scored."""

from __future__ import annotations

from contextlib import nullcontext

import orjson
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, IntegerType, StringType, StructField, StructType

from cso_lib.batch_mode import planned_rows
from cso_lib.config import Config
from cso_lib.delta_io import merge, read_table, stage_run
from cso_lib.ledger import flush_journal
from cso_lib.llm_models import LLMRole
from cso_lib.models import ScoreRequest, build_models, get_models
from cso_lib.progress import StageProgress
from cso_lib.stages.common import (
    hash_rows_of,
    ledger_bundles,
    map_batches,
    materialize,
    nothing_to_do,
    resolve_run_id,
    role_ledger,
    todo_states,
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
    """The PRM requests of a batch of bundles (`todo_states` order); todo rows carry step_idx, alt_idx and, for
    alternatives, the action."""
    requests: list[ScoreRequest] = []
    alt_idxs: list[int] = []
    for row, t, state, steps, tools, item in todo_states(rows):
        action = steps[t][0] if item["alt_idx"] < 0 else orjson.loads(item["action"])
        requests.append(
            ScoreRequest(row["trajectory_id"], row["task_id"], row["env"], t, list(state), tools, action=action)
        )
        alt_idxs.append(item["alt_idx"])
    return requests, alt_idxs


def hash_rows(cfg_json: str, rows: list[dict]) -> list[dict]:
    prm = get_models(cfg_json).prm
    requests, _ = _requests(rows)
    return hash_rows_of(requests, prm.all_hashes(requests))


def score_rows(cfg_json: str, stage: str, run_id: str, rows: list[dict]) -> list[dict]:
    prm = get_models(cfg_json).prm
    requests, alt_idxs = _requests(rows)
    with role_ledger(cfg_json, stage, run_id, rows, prm) as ctx:
        scores = prm.score(requests, ctx)
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
    with role_ledger(cfg_json, stage, run_id, rows, prm, defer=True) as ctx:
        prm.score(requests, ctx)
    return planned_rows(ctx, prm.client.provider)


def write_scores(spark: SparkSession, cfg: Config, run_id: str, todo: DataFrame, stats: dict, stage: str) -> None:
    cfg_json = cfg.model_dump_json()
    prm = build_models(cfg).prm
    llm = isinstance(prm, LLMRole)
    if todo.isEmpty():  # every score is stored already
        stats["unscored"] = 0
        nothing_to_do(spark, cfg, stats)
        return
    bundled = ledger_bundles(spark, cfg, run_id, todo, prm, stage, stats,
                             lambda rows: hash_rows(cfg_json, rows),
                             lambda rows: plan_rows(cfg_json, stage, run_id, rows))
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
