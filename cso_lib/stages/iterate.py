"""Iterative CSO rounds: evaluate the current policy, mine its failures, train on the verified pairs, register.

Round r, with policy version v_r (a local model folder, served in process: `policy.provider: transformers`):

1. evaluate v_r on the held-out tasks (`policy_evals`; cso_lib.stages.evaluate);
2. run v_r on `iterate.mine_tasks` training tasks; the episodes are logged as trajectories of round r;
3. the pipeline mines those logs: its failures, PRM and expert calls, branch rollouts continued by v_r
   itself, verified pairs in dpo_pairs/round=r (plus the exports);
4. DPO on the pairs with v_r as the policy to train AND as the reference model (cso_lib.train);
5. register the result as v_{r+1} in `policy_versions` (Delta): round r+1 uses it as policy and reference.

A round that finds no pairs trains nothing and registers nothing: the next round mines the same policy again.
The run resumes from `policy_versions`: the latest registered version is the current policy, and the next
round number follows every round already in `trajectories`. After the last round the final version is evaluated too.

On the embedded default the initial policy is the tiny local model (random weights: its episodes never reach
an answer, so verified rounds find no pairs; `cso.verify=false`, the paper's no-verification ablation,
exercises training on every round) and the world is the simulation.
"""

from __future__ import annotations

import json
import logging

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from cso_lib.config import Config
from cso_lib.delta_io import merge, new_run_id, now, read_table
from cso_lib.stages import evaluate, pipeline
from schemas.tables import TABLES

log = logging.getLogger("cso.iterate")


def version_name(n: int) -> str:
    return f"policy-v{n}"


def models_dir(cfg: Config) -> str:
    return cfg.iterate.models_dir or cfg.storage.table("_models")


def round_config(cfg: Config, round_: int, version: str, model_path: str, run_id: str) -> Config:
    """The configuration of round `round_` with `model_path` (version `version`) as policy and reference."""
    rcfg = cfg.model_copy(deep=True)
    rcfg.round, rcfg.run_id = round_, run_id
    rcfg.policy.provider, rcfg.policy.model = "transformers", model_path
    rcfg.eval.policy_version = version
    rcfg.select.round, rcfg.select.policy_version = round_, version
    rcfg.train.model, rcfg.train.ref_model = model_path, None  # None: the reference is the policy itself
    rcfg.train.pairs = []
    rcfg.train.output_dir = f"{models_dir(cfg)}/{version_name(int(version.rsplit('v', 1)[1]) + 1)}"
    return rcfg


def _register(spark: SparkSession, cfg: Config, row: dict) -> None:
    full = {f.name: None for f in TABLES["policy_versions"].fields} | row | {"created_at": now()}
    merge(spark, cfg, "policy_versions", spark.createDataFrame([full], TABLES["policy_versions"]))


def current_version(spark: SparkSession, cfg: Config) -> dict:
    """The latest registered policy version; registers the initial one (round -1) on first use."""
    latest = read_table(spark, cfg, "policy_versions").orderBy(F.col("round").desc()).first()
    if latest is not None:
        return latest.asDict()
    path = cfg.iterate.initial_model
    if path is None:
        from cso_lib.tiny_model import default_tiny_model_dir, ensure_tiny_model

        path = str(ensure_tiny_model(default_tiny_model_dir()))
    row = dict(policy_version=version_name(0), round=-1, model_path=path, parent_version=None, pairs=0,
               train_steps=0, lora=False, status="initial", run_id=cfg.run_id or new_run_id("iterate"))
    _register(spark, cfg, row)
    return row


def _loss_summary(history: list[dict]) -> dict:
    steps = [h for h in history if "loss" in h]
    return {"first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
            "last_reward_margin": steps[-1].get("rewards/margins") if steps else None}


def next_round(spark: SparkSession, cfg: Config, current: dict) -> int:
    """After the current version's round and after every round already in `trajectories`."""
    latest = read_table(spark, cfg, "trajectories").agg(F.max("round")).first()[0]
    return max(current["round"], -1 if latest is None else latest) + 1


def run_round(spark: SparkSession, cfg: Config, current: dict, r: int) -> dict:
    """Round `r` with `current` (a policy_versions row) as the policy; returns what happened."""
    from cso_lib.train import train

    run_id = new_run_id(f"iterate-r{r}")
    rcfg = round_config(cfg, r, current["policy_version"], current["model_path"], run_id)
    out: dict = {"round": r, "policy_version": current["policy_version"], "run_id": run_id}
    out["heldout"] = evaluate.evaluate(rcfg, spark)
    mined = evaluate.evaluate(rcfg, spark, offset=0, n=cfg.iterate.mine_tasks, logs_name=f"mine-round{r}")
    out["mined_episodes"] = {k: mined[k] for k in ("task_set", "successes", "success_rate", "episodes_path")}
    rcfg.ingest.paths = [mined["episodes_path"]]
    results = pipeline.run(rcfg, spark, exports=True)
    out["pairs"] = pairs = results["summary"]["pairs"]
    if not pairs:
        log.warning("round %d: no %s pairs from %s; the policy is not trained this round", r,
                    "verified" if rcfg.cso.verify else "", current["policy_version"])
        out["status"] = "no pairs: policy unchanged"
        return out
    trained = train(rcfg)
    new = version_name(int(current["policy_version"].rsplit("v", 1)[1]) + 1)
    row = dict(policy_version=new, round=r, model_path=trained["output_dir"],
               parent_version=current["policy_version"], pairs=trained["pairs"], train_steps=trained["steps"],
               train_loss=trained["train_loss"], beta=trained["beta"], lora=trained["lora"], status="trained",
               details=json.dumps({k: v for k, v in trained.items() if k != "history"}, default=str), run_id=run_id,
               **_loss_summary(trained["history"]))
    _register(spark, cfg, row)
    out.update(status="trained", new_version=new, model_path=trained["output_dir"],
               **{k: row[k] for k in ("first_loss", "last_loss", "last_reward_margin")})
    return out


def run(cfg: Config, spark: SparkSession, rounds: int | None = None) -> dict:
    """`rounds` (default iterate.rounds) rounds from the latest registered version, then a final evaluation."""
    current = current_version(spark, cfg)
    done = []
    for _ in range(rounds or cfg.iterate.rounds):
        result = run_round(spark, cfg, current, next_round(spark, cfg, current))
        done.append(result)
        log.info("round %d: %s", result["round"], {k: v for k, v in result.items() if k != "heldout"})
        current = current_version(spark, cfg)
    final_cfg = round_config(cfg, next_round(spark, cfg, current), current["policy_version"], current["model_path"],
                             new_run_id("iterate-final"))
    final = evaluate.evaluate(final_cfg, spark)
    return {"rounds": done, "final_version": current["policy_version"], "final_eval": final}
