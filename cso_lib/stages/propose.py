"""Expert alternatives: k proposed next actions per step, in the policy's own action format.

Order `prm_first` (default) asks only where the policy's action scored below gamma_low, since no other
step can become a candidate; `paper` asks at every step, as the paper does. Alternatives identical to the
policy's own action (same tools and arguments) are dropped: they cannot make a preference pair.
"""

from __future__ import annotations

from contextlib import nullcontext

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, StringType, StructField, StructType

from cso_lib.batch_mode import planned_rows
from cso_lib.config import Config
from cso_lib.delta_io import merge, read_table, stage_run
from cso_lib.ledger import flush_journal
from cso_lib.llm_models import LLMRole
from cso_lib.messages import signature
from cso_lib.models import StepRequest, build_models, get_models
from cso_lib.progress import StageProgress
from cso_lib.stages.common import (
    dumps,
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

PROPOSED = StructType(
    [
        StructField("trajectory_id", StringType(), False),
        StructField("step_idx", IntegerType(), False),
        StructField("alt_idx", IntegerType(), False),
        StructField("expert_model", StringType(), False),
        StructField("prompt_version", StringType(), False),
        StructField("action", StringType(), False),
    ]
)


def _requests(rows: list[dict]) -> tuple[list[StepRequest], list[dict]]:
    requests, policy_actions = [], []
    for row, t, state, steps, tools, _ in todo_states(rows):
        requests.append(StepRequest(row["trajectory_id"], row["task_id"], row["env"], t, list(state), tools))
        policy_actions.append(steps[t][0])
    return requests, policy_actions


def hash_rows(cfg_json: str, k: int, rows: list[dict]) -> list[dict]:
    expert = get_models(cfg_json).expert
    requests, _ = _requests(rows)
    return hash_rows_of(requests, expert.all_hashes(requests, k))


def propose_rows(cfg_json: str, k: int, run_id: str, rows: list[dict]) -> list[dict]:
    expert = get_models(cfg_json).expert
    requests, policy_actions = _requests(rows)
    with role_ledger(cfg_json, "propose", run_id, rows, expert) as ctx:
        proposals = expert.propose(requests, k, ctx)
    out = []
    for req, own, alts in zip(requests, policy_actions, proposals, strict=True):
        kept = [a for a in alts if signature(a) != signature(own)]
        for j, action in enumerate(kept[:k]):
            out.append(
                {
                    "trajectory_id": req.trajectory_id,
                    "step_idx": req.step_idx,
                    "alt_idx": j,
                    "expert_model": expert.name,
                    "prompt_version": expert.prompt_version,
                    "action": dumps({"role": "assistant", **{x: v for x, v in action.items() if x != "role"}}),
                }
            )
    return out


def plan_rows(cfg_json: str, k: int, run_id: str, rows: list[dict]) -> list[dict]:
    """Batch mode: the expert requests the executor pass would send now, after the ledger join (none sent)."""
    expert = get_models(cfg_json).expert
    requests, _ = _requests(rows)
    with role_ledger(cfg_json, "propose", run_id, rows, expert, defer=True) as ctx:
        expert.propose(requests, k, ctx)
    return planned_rows(ctx, expert.client.provider)


def run(cfg: Config, spark: SparkSession) -> dict:
    run_id = resolve_run_id(spark, cfg)
    models = build_models(cfg)
    with stage_run(spark, cfg, run_id, "propose") as stats:
        steps = work_steps(spark, cfg, run_id).select("trajectory_id", "step_idx")
        if cfg.cso.order == "prm_first":
            low = (
                read_table(spark, cfg, "prm_scores")
                .where(
                    (F.col("alt_idx") == -1)
                    & (F.col("prm_model") == models.prm.name)
                    & (F.col("status") == "ok")
                    & (F.col("score") < cfg.cso.gamma_low)
                )
                .select("trajectory_id", "step_idx")
            )
            steps = steps.join(low, ["trajectory_id", "step_idx"], "left_semi")
        done = (
            read_table(spark, cfg, "expert_alternatives")
            .where(F.col("expert_model") == models.expert.name)
            .select("trajectory_id", "step_idx")
            .distinct()
        )
        todo = steps.join(done, ["trajectory_id", "step_idx"], "left_anti")
        stats["rows_in"] = stats["steps_asked"] = todo.count()
        if not stats["rows_in"]:  # every asked step has its alternatives
            nothing_to_do(spark, cfg, stats)
            return {"run_id": run_id, **stats}
        cfg_json, k = cfg.model_dump_json(), cfg.cso.k
        bundled = ledger_bundles(spark, cfg, run_id, todo, models.expert, "propose", stats,
                                 lambda rows: hash_rows(cfg_json, k, rows),
                                 lambda rows: plan_rows(cfg_json, k, run_id, rows))
        out = map_batches(bundled, lambda rows: propose_rows(cfg_json, k, run_id, rows), PROPOSED)
        try:
            with StageProgress(cfg.journal_path, "propose") if isinstance(models.expert, LLMRole) else nullcontext():
                out = materialize(
                    out.withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))
            stats["rows_out"] = out.count()
            merge(spark, cfg, "expert_alternatives", out)
        finally:
            stats["ledger_rows"] = flush_journal(spark, cfg)
    return {"run_id": run_id, **stats}
