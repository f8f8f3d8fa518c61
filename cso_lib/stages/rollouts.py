"""Branch rollouts with verification: each candidate's high-scoring alternatives, run to the end.

The branch starts from s_t rebuilt from the log, executes the alternative a'_t in the environment, and
the POLICY continues on its own until it answers or uses up `max_steps_after_branch` steps counted from
the branch point. The final answer is verified against the trajectory's ground truth.
"""

from __future__ import annotations

import orjson
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, IntegerType, StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_io import merge, read_table, stage_run
from cso_lib.envs import environment_for
from cso_lib.ledger import flush_journal
from cso_lib.llm_models import LLMRole
from cso_lib.messages import state_at
from cso_lib.models import build_models, get_models
from cso_lib.rollout import Branch, run_branches
from cso_lib.stages.common import (
    bundles,
    dumps,
    ledger_context,
    map_batches,
    materialize,
    parse_bundle,
    resolve_run_id,
    work_steps,
)
from cso_lib.verify import verify

VERIFIER = "auto(exact|numeric|set)"

ROLLED = StructType(
    [
        StructField("trajectory_id", StringType(), False),
        StructField("step_idx", IntegerType(), False),
        StructField("alt_idx", IntegerType(), False),
        StructField("rollout_idx", IntegerType(), False),
        StructField("policy_model", StringType(), False),
        StructField("status", StringType(), False),
        StructField("skip_reason", StringType(), True),
        StructField("continuation", StringType(), False),
        StructField("steps_after_branch", IntegerType(), False),
        StructField("final_answer", StringType(), True),
        StructField("success", BooleanType(), True),
        StructField("verifier", StringType(), False),
        StructField("verdict", StringType(), True),
    ]
)


def rollout_rows(cfg_json: str, budget: int, run_id: str, rows: list[dict]) -> list[dict]:
    models = get_models(cfg_json)
    branches, skipped, truths = [], [], {}
    envs = {}
    for row in rows:
        preamble, steps, tools, todo = parse_bundle(row)
        env = envs.get(row["env"]) or environment_for(row["env"], models.world)
        reason = (f"no environment for env {row['env']!r} in this build" if env is None
                  else env.replayable(row["task_id"]))
        truths[row["trajectory_id"]] = row["ground_truth"]
        for item in todo:
            base = dict(trajectory_id=row["trajectory_id"], step_idx=item["step_idx"], alt_idx=item["alt_idx"],
                        rollout_idx=item["rollout_idx"])
            if reason is not None:
                skipped.append({**base, "status": "skipped", "skip_reason": reason})
                continue
            envs[row["env"]] = env
            branches.append(Branch(row["trajectory_id"], row["task_id"], row["env"], item["step_idx"], item["alt_idx"],
                                   item["rollout_idx"], state_at(preamble, steps, item["step_idx"]),
                                   orjson.loads(item["action"]), tools))
    ctx = ledger_context(cfg_json, "rollouts", run_id, []) if isinstance(models.policy, LLMRole) else None
    try:
        run_branches(branches, models.policy, envs, budget, ctx)
    finally:
        if ctx is not None and ctx.journal is not None:
            ctx.journal.close()
    out = []
    for b in branches:
        success, verdict = verify(b.answer, truths[b.trajectory_id])
        out.append(dict(trajectory_id=b.trajectory_id, step_idx=b.step_idx, alt_idx=b.alt_idx,
                        rollout_idx=b.rollout_idx, status=b.status, skip_reason=None,
                        continuation=dumps(b.continuation), steps_after_branch=b.steps_after_branch,
                        final_answer=b.answer, success=success, verdict=verdict))
    for s in skipped:
        out.append({**s, "continuation": "[]", "steps_after_branch": 0, "final_answer": None, "success": None,
                    "verdict": None})
    return [{**r, "policy_model": models.policy.name, "verifier": VERIFIER} for r in out]


def run(cfg: Config, spark: SparkSession) -> dict:
    run_id = resolve_run_id(spark, cfg)
    models = build_models(cfg)
    with stage_run(spark, cfg, run_id, "rollouts") as stats:
        steps = work_steps(spark, cfg, run_id).select("trajectory_id", "step_idx")
        cands = (
            read_table(spark, cfg, "critical_candidates")
            .where("is_candidate")
            .join(steps, ["trajectory_id", "step_idx"], "left_semi")
            .select("trajectory_id", "step_idx", F.explode("high_alt_idxs").alias("alt_idx"))
            .withColumn("rollout_idx", F.explode(F.sequence(F.lit(0), F.lit(cfg.cso.rollouts_per_alternative - 1))))
        )
        alts = read_table(spark, cfg, "expert_alternatives").where(F.col("expert_model") == models.expert.name)
        done = read_table(spark, cfg, "branch_rollouts").where(F.col("policy_model") == models.policy.name)
        todo = cands.join(done, ["trajectory_id", "step_idx", "alt_idx", "rollout_idx"], "left_anti").join(
            alts.select("trajectory_id", "step_idx", "alt_idx", "action"), ["trajectory_id", "step_idx", "alt_idx"])
        stats["rows_in"] = todo.count()
        cfg_json, budget = cfg.model_dump_json(), cfg.cso.max_steps_after_branch
        out = map_batches(bundles(spark, cfg, run_id, todo), lambda rows: rollout_rows(cfg_json, budget, run_id, rows),
                          ROLLED)
        out = materialize(out.withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))
        stats["rows_out"] = out.count()
        stats["successes"] = out.where("success").count()
        stats["skipped"] = out.where(F.col("status") == "skipped").count()
        merge(spark, cfg, "branch_rollouts", out)
        if isinstance(models.policy, LLMRole):
            stats["ledger_rows"] = flush_journal(spark, cfg)
    return {"run_id": run_id, **stats}
