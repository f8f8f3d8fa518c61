"""Evaluation: a policy's success rate on a task set, with its 95% Wilson interval, per policy version.

Each task is one episode run by the rollout engine (`cso_lib.rollout.run_branches`): the policy's first
action is the branch's action at step 0, then the policy continues in lockstep with every other episode
(one batched `policy.act` per turn) until it answers or uses `eval.max_steps` steps. Final answers are
verified against the ground truth as branch rollouts are. Episodes run on the executors, a few tasks per
Spark task (`tasks_at_once` partitions), each worker building the policy once.

Writes one row per (policy version, task set) to `policy_evals` (Delta) and the episodes as trajectory logs
in the `messages` input format (`<warehouse>/_eval_logs/<version>/<task set>.jsonl`), which `cso ingest` reads:
`cso iterate` mines the failed ones.

The task set is the simulation world's: tasks [offset, offset + n) of `sim.seed`. By default the held-out
tasks after the `sim.n_tasks` whose logs are mined. Other environments need tasks with ground truth and an
environment that executes them (cso_lib.envs); this build has the simulation's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql.types import BooleanType, IntegerType, StringType, StructField, StructType

from cso_lib.config import Config
from cso_lib.delta_io import merge, new_run_id, now, stage_run
from cso_lib.envs import SimEnvironment
from cso_lib.exports import wilson_interval
from cso_lib.models import StepRequest, build_models, get_models
from cso_lib.rollout import Branch, run_branches
from cso_lib.sim.world import SYSTEM_PROMPT, TOOLS
from cso_lib.stages.common import dumps, map_batches
from cso_lib.stages.export import write_text
from cso_lib.verify import verify
from schemas.tables import TABLES

EPISODE = StructType(
    [
        StructField("task_id", StringType(), False),
        StructField("trajectory_id", StringType(), False),
        StructField("status", StringType(), False),  # answered | budget_exhausted | error (the env failed)
        StructField("answer", StringType(), True),
        StructField("ground_truth", StringType(), False),
        StructField("success", BooleanType(), False),
        StructField("steps", IntegerType(), False),
        StructField("messages", StringType(), False),  # JSON: the whole conversation
    ]
)


def task_ids(cfg: Config, offset: int | None = None, n: int | None = None) -> list[str]:
    start = cfg.sim.n_tasks if offset is None else offset
    n = cfg.eval.n_tasks if n is None else n
    return [f"sim-{cfg.sim.seed}-{i:04d}" for i in range(start, start + n)]


def task_set_name(cfg: Config, offset: int | None = None, n: int | None = None) -> str:
    start = cfg.sim.n_tasks if offset is None else offset
    return f"sim(seed={cfg.sim.seed})[{start}:{start + (cfg.eval.n_tasks if n is None else n)}]"


def policy_version(cfg: Config) -> str:
    if cfg.eval.policy_version:
        return cfg.eval.policy_version
    if cfg.policy.provider == "sim":
        return cfg.sim.policy_version
    return Path(cfg.policy.model).name or cfg.policy.model


def run_episodes(policy, env: SimEnvironment, tasks: list[str], max_steps: int, prefix: str) -> list[dict]:
    """Run one episode per task to an answer or `max_steps` policy steps; one result dict each."""
    world = env.world
    states = {t: [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": world.task(t).query}]
              for t in tasks}
    first = policy.act([StepRequest(f"{prefix}/{t}", t, "sim", 0, states[t], TOOLS, key=f"{prefix}/{t}")
                        for t in tasks])
    branches = [Branch(f"{prefix}/{t}", t, "sim", 0, -1, 0, states[t], action, TOOLS)
                for t, action in zip(tasks, first, strict=True)]
    if max_steps > 1:
        run_branches(branches, policy, {"sim": env}, max_steps - 1)
    else:
        for b in branches:
            b._take(b.alternative, env)
    out = []
    for b in branches:
        if b.status == "running":  # max_steps == 1 and the first action did not answer
            b.status = "budget_exhausted"
        truth = world.task(b.task_id).answer
        ok, _ = verify(b.answer, truth)
        out.append(dict(task_id=b.task_id, trajectory_id=b.trajectory_id, status=b.status, answer=b.answer,
                        ground_truth=truth, success=bool(ok), steps=1 + b.steps_after_branch,
                        messages=dumps(b.state + b.continuation)))
    return out


def episode_rows(cfg_json: str, max_steps: int, prefix: str, rows: list[dict]) -> list[dict]:
    models = get_models(cfg_json)
    return run_episodes(models.policy, SimEnvironment(models.world), [r["task_id"] for r in rows], max_steps, prefix)


def log_record(ep: dict, version: str, policy_model: str, round_: int) -> dict:
    """An episode as a trajectory log in the `messages` input format (cso ingest)."""
    msgs = json.loads(ep["messages"])
    return {"trajectory_id": ep["trajectory_id"], "task_id": ep["task_id"], "query": msgs[1]["content"],
            "ground_truth": ep["ground_truth"],
            "outcome": int(ep["success"]), "policy_model": policy_model, "policy_version": version, "env": "sim",
            "round": round_, "tools": TOOLS, "messages": msgs,
            "metadata": {"evaluation": True, "status": ep["status"]}}


def evaluate(cfg: Config, spark: SparkSession, offset: int | None = None, n: int | None = None,
             logs_name: str | None = None) -> dict:
    """Evaluate the configured policy on tasks [offset, offset + n); MERGE the result into `policy_evals`."""
    run_id = cfg.run_id or new_run_id("eval")
    version, tasks, task_set = policy_version(cfg), task_ids(cfg, offset, n), task_set_name(cfg, offset, n)
    models = build_models(cfg)
    with stage_run(spark, cfg, run_id, "evaluate") as stats:
        cfg_json, max_steps, prefix = cfg.model_dump_json(), cfg.eval.max_steps, f"eval/{version}/r{cfg.round}"
        todo = spark.createDataFrame([(t,) for t in tasks], "task_id string").repartition(cfg.tasks_at_once)
        episodes = [r.asDict() for r in map_batches(
            todo, lambda rows: episode_rows(cfg_json, max_steps, prefix, rows), EPISODE).collect()]
        episodes.sort(key=lambda e: e["task_id"])
        k, total = sum(e["success"] for e in episodes), len(episodes)
        lo, hi = wilson_interval(k, total)
        safe = lambda text: re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")  # noqa: E731
        logs = f"{cfg.storage.table('_eval_logs')}/{safe(version)}/{safe(logs_name or task_set)}.jsonl"
        write_text(spark, logs, (json.dumps(log_record(e, version, models.policy.name, cfg.round)) + "\n"
                                 for e in episodes))
        row = dict(policy_version=version, task_set=task_set, policy_model=models.policy.name, round=cfg.round,
                   n_tasks=total, successes=k, success_rate=k / total if total else 0.0, ci_low=lo, ci_high=hi,
                   ci_method="wilson-95", answered=sum(e["status"] == "answered" for e in episodes),
                   budget_exhausted=sum(e["status"] == "budget_exhausted" for e in episodes),
                   mean_steps=sum(e["steps"] for e in episodes) / total if total else 0.0, max_steps=max_steps,
                   episodes_path=logs, run_id=run_id, created_at=now())
        merge(spark, cfg, "policy_evals", spark.createDataFrame([row], TABLES["policy_evals"]), update=True)
        stats.update(rows_in=total, rows_out=1, **{k_: row[k_] for k_ in (
            "policy_version", "task_set", "successes", "success_rate", "ci_low", "ci_high", "episodes_path")})
    return {"run_id": run_id, **stats}


def run(cfg: Config, spark: SparkSession) -> dict:
    return evaluate(cfg, spark, cfg.eval.offset)

