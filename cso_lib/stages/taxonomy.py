"""Error taxonomy: each verified critical step gets one of the paper's categories from the judge model.

The judge (`judge`, or the PRM's model when unset) sees the state the policy was in, its rejected action
and the verified chosen one, through the versioned `error-taxonomy` prompt (trajectory content delimited
like the PRM's), and answers one of prompts.CATEGORIES: tool_invocation, reasoning, task_understanding,
information_extraction, other. An answer that does not parse is asked again and then recorded as
`unclassified` (error_category null), never given a default. The result updates the `critical_steps` row
in place (MERGE) with the category, the status, the judge's reasoning, its model name and the prompt version.

To-do: the run's verified rows whose taxonomy_model is not the configured judge's (never classified, or
by another judge or prompt version); a rerun with the same judge asks nothing. On the embedded default the
judge is the simulation's (`models.SimJudge`), which reads the category off the world's truth.
"""

from __future__ import annotations

from contextlib import nullcontext

import orjson
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, StringType, StructField, StructType

from cso_lib.batch_mode import planned_rows
from cso_lib.config import Config
from cso_lib.delta_io import merge, read_table, stage_run
from cso_lib.ledger import flush_journal
from cso_lib.llm_models import LLMRole
from cso_lib.models import TaxonomyRequest, build_models, get_models
from cso_lib.progress import StageProgress
from cso_lib.stages.build_pairs import TAXONOMY_COLUMNS
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

KEYS = ["trajectory_id", "step_idx", "alt_idx"]

CLASSIFIED = StructType(
    [
        StructField("trajectory_id", StringType(), False),
        StructField("step_idx", IntegerType(), False),
        StructField("alt_idx", IntegerType(), False),
        StructField("error_category", StringType(), True),
        StructField("taxonomy_status", StringType(), False),
        StructField("taxonomy_reasoning", StringType(), True),
        StructField("taxonomy_model", StringType(), False),
        StructField("taxonomy_prompt_version", StringType(), False),
    ]
)


def _requests(rows: list[dict]) -> tuple[list[TaxonomyRequest], list[int]]:
    """A batch's requests (`todo_states` order); todo rows carry step_idx, alt_idx, chosen."""
    requests, alt_idxs = [], []
    for row, t, state, steps, tools, item in todo_states(rows):
        requests.append(TaxonomyRequest(row["trajectory_id"], row["task_id"], row["env"], t, list(state), tools,
                                        rejected=steps[t][0], chosen=orjson.loads(item["chosen"])))
        alt_idxs.append(item["alt_idx"])
    return requests, alt_idxs


def hash_rows(cfg_json: str, rows: list[dict]) -> list[dict]:
    judge = get_models(cfg_json).judge
    requests, _ = _requests(rows)
    return hash_rows_of(requests, judge.all_hashes(requests))


def classify_rows(cfg_json: str, run_id: str, rows: list[dict]) -> list[dict]:
    judge = get_models(cfg_json).judge
    requests, alt_idxs = _requests(rows)
    with role_ledger(cfg_json, "taxonomy", run_id, rows, judge) as ctx:
        categories = judge.classify(requests, ctx)
    return [
        {
            "trajectory_id": r.trajectory_id,
            "step_idx": r.step_idx,
            "alt_idx": a,
            "error_category": c.category,
            "taxonomy_status": c.status,
            "taxonomy_reasoning": c.reasoning,
            "taxonomy_model": judge.name,
            "taxonomy_prompt_version": judge.prompt_version,
        }
        for r, a, c in zip(requests, alt_idxs, categories, strict=True)
    ]


def plan_rows(cfg_json: str, run_id: str, rows: list[dict]) -> list[dict]:
    """Batch mode: the judge requests the executor pass would send now, after the ledger join (none sent)."""
    judge = get_models(cfg_json).judge
    requests, _ = _requests(rows)
    with role_ledger(cfg_json, "taxonomy", run_id, rows, judge, defer=True) as ctx:
        judge.classify(requests, ctx)
    return planned_rows(ctx, judge.client.provider)


def run(cfg: Config, spark: SparkSession) -> dict:
    run_id = resolve_run_id(spark, cfg)
    judge = build_models(cfg).judge
    llm = isinstance(judge, LLMRole)
    with stage_run(spark, cfg, run_id, "taxonomy") as stats:
        steps = work_steps(spark, cfg, run_id).select("trajectory_id", "step_idx")
        todo = (
            read_table(spark, cfg, "critical_steps")
            .where(F.col("verified") & ~F.coalesce(F.col("taxonomy_model") == judge.name, F.lit(False)))
            .join(steps, ["trajectory_id", "step_idx"], "left_semi")
            .select(*KEYS, "chosen")
        )
        stats["rows_in"] = todo.count()
        stats["judge"] = judge.name
        if not stats["rows_in"]:  # every verified pair is classified by this judge
            stats["unclassified"], stats["categories"] = 0, {}
            nothing_to_do(spark, cfg, stats)
            return {"run_id": run_id, **stats}
        cfg_json = cfg.model_dump_json()
        try:
            bundled = ledger_bundles(spark, cfg, run_id, todo, judge, "taxonomy", stats,
                                     lambda rows: hash_rows(cfg_json, rows), lambda rows: plan_rows(cfg_json, run_id, rows))
            out = map_batches(bundled, lambda rows: classify_rows(cfg_json, run_id, rows), CLASSIFIED)
            with StageProgress(cfg.journal_path, "taxonomy") if llm else nullcontext():
                out = materialize(out)  # the judge is asked here, exactly once
            # whole rows for the MERGE: the table's row with the taxonomy columns replaced
            rows = materialize(
                read_table(spark, cfg, "critical_steps").where(F.col("verified")).drop(*TAXONOMY_COLUMNS)
                .join(out, KEYS))
            stats["rows_out"] = rows.count()
            stats["unclassified"] = out.where(F.col("taxonomy_status") != "ok").count()
            stats["categories"] = {r["error_category"]: r["n"] for r in
                                   out.where(F.col("taxonomy_status") == "ok").groupBy("error_category")
                                   .agg(F.count("*").alias("n")).collect()}
            merge(spark, cfg, "critical_steps", rows, update=True)
        finally:
            stats["ledger_rows"] = flush_journal(spark, cfg)
    return {"run_id": run_id, **stats}
