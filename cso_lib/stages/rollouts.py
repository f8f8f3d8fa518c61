"""Branch rollouts with verification: each candidate's high-scoring alternatives, run to the end.

The branch starts from s_t rebuilt from the log, executes the alternative a'_t in the environment, and
the POLICY continues on its own until it answers or uses up `max_steps_after_branch` steps counted from
the branch point. The final answer is verified against the trajectory's ground truth (`cso.verifier`: rules,
an LLM judge, or the judge for what the rules reject); the verifier and its verdict are stored per branch.

- `cso.rollouts_per_alternative` rollouts per alternative give a success count; `cso.original_rollouts`
  re-rolls the policy's ORIGINAL action a_t (rows with alt_idx = -1), so build_pairs can measure the flip.
- A branch whose environment state cannot be rebuilt from the log (`Environment.replayable`) is stored as
  skipped with the reason.
- With `rollouts.gpus_per_task` > 0 the stage's batch function runs under a Spark ResourceProfile asking for
  GPUs (stage-level scheduling; `rollout_profile`): on a cluster the rollouts land on GPU executors while the
  other stages keep the default profile. Each row records the task's resources (`task_resources`), and a
  task's assigned GPU addresses become CUDA_VISIBLE_DEVICES before its engine starts.
"""

from __future__ import annotations

import os

import orjson
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, IntegerType, StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_io import merge, read_table, stage_run
from cso_lib.envs import environment_for
from cso_lib.errors import ConfigError
from cso_lib.ledger import flush_journal
from cso_lib.llm_models import LLMRole
from cso_lib.messages import state_at
from cso_lib.models import build_models, get_config, get_models
from cso_lib.rollout import Branch, run_branches
from cso_lib.stages.common import (
    bundles,
    dumps,
    ledger_context,
    map_batches,
    materialize,
    nothing_to_do,
    parse_bundle,
    resolve_run_id,
    work_steps,
)
from cso_lib.verify import verify

VERIFIER = "auto(exact|numeric|set)"  # the rule-based verifier's name

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
        StructField("task_resources", StringType(), True),
    ]
)


def rollout_profile(cfg: Config):
    """The ResourceProfile of the rollout stage, or None (`rollouts.gpus_per_task` = 0: default executors)."""
    r = cfg.rollouts
    if not r.gpus_per_task:
        return None
    from pyspark.resource import ExecutorResourceRequests, ResourceProfileBuilder, TaskResourceRequests

    builder = ResourceProfileBuilder().require(TaskResourceRequests().cpus(r.cpus_per_task).resource("gpu", r.gpus_per_task))
    if r.executor_gpus is not None:
        ereqs = ExecutorResourceRequests().resource("gpu", r.executor_gpus, r.gpu_discovery_script or "")
        if r.executor_cores:
            ereqs = ereqs.cores(r.executor_cores)
        if r.executor_memory:
            ereqs = ereqs.memory(r.executor_memory)
        builder = builder.require(ereqs)
    return builder.build


def task_resources() -> dict | None:
    """This Spark task's resources ({"cpus": n, "<name>": [addresses]}); None outside a task. Exposes the
    assigned GPUs to CUDA (CUDA_VISIBLE_DEVICES) unless the executor already set it."""
    from pyspark import TaskContext

    tc = TaskContext.get()
    if tc is None:
        return None
    res = {name: list(info.addresses) for name, info in tc.resources().items()}
    if res.get("gpu"):
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(res["gpu"]))
    return {"cpus": tc.cpus(), **res}


def _judge(cfg_json: str):
    cfg = get_config(cfg_json)
    if cfg.cso.verifier == "rules":
        return None
    from cso_lib.answer_judge import LLMAnswerJudge

    return LLMAnswerJudge(cfg.verifier_model, 1.0 / cfg.tasks_at_once)


def verify_branches(branches: list[Branch], truths: dict[str, object], mode: str, judge, ctx) -> list[tuple]:
    """(success, verifier, verdict) per branch: rules, the judge, or the judge where the rules say no."""
    out: list[tuple | None] = []
    ask = []
    for i, b in enumerate(branches):
        if b.status == "error":
            out.append((None, "none", None))
            continue
        success, verdict = verify(b.answer, truths[b.trajectory_id])
        out.append((success, VERIFIER, verdict))
        if mode != "rules" and b.answer is not None and success is not None and (mode == "judge" or not success):
            ask.append(i)
    if ask:
        from cso_lib.answer_judge import question_of

        items = [(question_of(branches[i].state), branches[i].answer, truths[branches[i].trajectory_id],
                  branches[i].trajectory_id) for i in ask]
        for i, (success, verdict) in zip(ask, judge.judge(items, ctx), strict=True):
            out[i] = (success, judge.name, verdict)
    return out  # type: ignore[return-value]


def rollout_rows(cfg_json: str, budget: int, run_id: str, rows: list[dict]) -> list[dict]:
    resources = task_resources()
    models = get_models(cfg_json)
    cfg = get_config(cfg_json)
    branches, skipped, truths = [], [], {}
    envs = {}
    for row in rows:
        preamble, steps, tools, todo = parse_bundle(row)
        if row["env"] not in envs:
            envs[row["env"]] = environment_for(row["env"], models.world, cfg.rollouts.web_site_seed)
        env = envs[row["env"]]
        truths[row["trajectory_id"]] = row["ground_truth"]
        for item in todo:
            t = item["step_idx"]
            state = state_at(preamble, steps, t)
            reason = (f"no environment for env {row['env']!r} in this build" if env is None
                      else env.replayable(row["task_id"], state))
            base = dict(trajectory_id=row["trajectory_id"], step_idx=t, alt_idx=item["alt_idx"],
                        rollout_idx=item["rollout_idx"])
            if reason is not None:
                skipped.append({**base, "status": "skipped", "skip_reason": reason})
                continue
            # alt_idx -1: a re-rollout of the policy's original action a_t, for the flip
            action = steps[t][0] if item["alt_idx"] == -1 else orjson.loads(item["action"])
            branches.append(Branch(row["trajectory_id"], row["task_id"], row["env"], t, item["alt_idx"],
                                   item["rollout_idx"], state, action, tools))
    judge = _judge(cfg_json)
    ctx = (ledger_context(cfg_json, "rollouts", run_id, [])
           if isinstance(models.policy, LLMRole) or judge is not None else None)
    try:
        run_branches(branches, models.policy, {k: v for k, v in envs.items() if v is not None}, budget,
                     ctx if isinstance(models.policy, LLMRole) else None, cfg.rollouts.tool_threads)
        verdicts = verify_branches(branches, truths, cfg.cso.verifier, judge, ctx)
    finally:
        if ctx is not None and ctx.journal is not None:
            ctx.journal.close()
    out = []
    for b, (success, verifier, verdict) in zip(branches, verdicts, strict=True):
        out.append(dict(trajectory_id=b.trajectory_id, step_idx=b.step_idx, alt_idx=b.alt_idx,
                        rollout_idx=b.rollout_idx, status=b.status, skip_reason=b.error,
                        continuation=dumps(b.continuation), steps_after_branch=b.steps_after_branch,
                        final_answer=b.answer, success=success, verifier=verifier, verdict=verdict))
    for s in skipped:
        out.append({**s, "continuation": "[]", "steps_after_branch": 0, "final_answer": None, "success": None,
                    "verifier": "none", "verdict": None})
    res = dumps(resources) if resources is not None else None
    return [{**r, "policy_model": models.policy.name, "task_resources": res} for r in out]


def run(cfg: Config, spark: SparkSession) -> dict:
    run_id = resolve_run_id(spark, cfg)
    if cfg.cso.verifier != "rules" and cfg.verifier_model is None:
        raise ConfigError(f"cso.verifier={cfg.cso.verifier!r} needs `verifier_model` (the judge's provider and model)")
    models = build_models(cfg)
    with stage_run(spark, cfg, run_id, "rollouts") as stats:
        steps = work_steps(spark, cfg, run_id).select("trajectory_id", "step_idx")
        cands = (
            read_table(spark, cfg, "critical_candidates")
            .where("is_candidate")
            .join(steps, ["trajectory_id", "step_idx"], "left_semi")
        )
        todo = cands.select("trajectory_id", "step_idx", F.explode("high_alt_idxs").alias("alt_idx")).withColumn(
            "rollout_idx", F.explode(F.sequence(F.lit(0), F.lit(cfg.cso.rollouts_per_alternative - 1))))
        if cfg.cso.original_rollouts:
            todo = todo.unionByName(cands.select("trajectory_id", "step_idx", F.lit(-1).alias("alt_idx")).withColumn(
                "rollout_idx", F.explode(F.sequence(F.lit(0), F.lit(cfg.cso.original_rollouts - 1)))))
        alts = read_table(spark, cfg, "expert_alternatives").where(F.col("expert_model") == models.expert.name)
        done = read_table(spark, cfg, "branch_rollouts").where(F.col("policy_model") == models.policy.name)
        todo = (
            todo.join(done, ["trajectory_id", "step_idx", "alt_idx", "rollout_idx"], "left_anti")
            .join(alts.select("trajectory_id", "step_idx", "alt_idx", "action"), ["trajectory_id", "step_idx", "alt_idx"],
                  "left")
            .where((F.col("alt_idx") == -1) | F.col("action").isNotNull())
        )
        stats["rows_in"] = todo.count()
        if not stats["rows_in"]:  # every branch is rolled out
            stats.update(successes=0, skipped=0, original_rollouts=0)
            nothing_to_do(spark, cfg, stats)
            return {"run_id": run_id, **stats}
        cfg_json, budget = cfg.model_dump_json(), cfg.cso.max_steps_after_branch
        out = map_batches(bundles(spark, cfg, run_id, todo), lambda rows: rollout_rows(cfg_json, budget, run_id, rows),
                          ROLLED, profile=rollout_profile(cfg))
        out = materialize(out.withColumn("run_id", F.lit(run_id)).withColumn("created_at", F.current_timestamp()))
        counts = out.agg(F.count("*").alias("rows_out"), F.count_if("success").alias("successes"),
                         F.count_if(F.col("status") == "skipped").alias("skipped"),
                         F.count_if(F.col("alt_idx") == -1).alias("original_rollouts")).first()
        stats.update(counts.asDict())
        merge(spark, cfg, "branch_rollouts", out)
        if isinstance(models.policy, LLMRole) or cfg.cso.verifier != "rules":
            stats["ledger_rows"] = flush_journal(spark, cfg)
    return {"run_id": run_id, **stats}
