"""`cso iterate`: evaluate -> mine -> train -> register, with the tiny local model as the policy."""

import json

import pytest
from pyspark.sql import functions as F

from cso_lib.config import load_config
from cso_lib.delta_io import read_table
from cso_lib.stages import iterate


def test_round_config_makes_the_version_policy_and_reference(tmp_path):
    cfg = load_config(None, [f"storage.warehouse={tmp_path / 'wh'}", "policy.params={max_tokens: 16}"])
    rcfg = iterate.round_config(cfg, 3, "policy-v2", "/models/policy-v2", "run-x")
    assert (rcfg.round, rcfg.run_id, rcfg.select.round, rcfg.select.policy_version) == (3, "run-x", 3, "policy-v2")
    assert (rcfg.policy.provider, rcfg.policy.model, rcfg.policy.params) == ("transformers", "/models/policy-v2",
                                                                             {"max_tokens": 16})
    assert rcfg.train.model == "/models/policy-v2" and rcfg.train.ref_model is None  # reference = the policy
    assert rcfg.train.output_dir == f"{tmp_path / 'wh'}/_models/policy-v3"
    assert rcfg.eval.policy_version == "policy-v2" and cfg.round == 0  # the base config is untouched


@pytest.mark.slow
def test_iterate_trains_registers_and_evaluates_the_new_version(spark, tiny_model_dir, tmp_path):
    cfg = load_config(None, [
        "spark.shuffle_partitions=2", f"storage.warehouse={tmp_path / 'wh'}", f"sim.logs_dir={tmp_path / 'logs'}",
        "sim.n_tasks=8", "sim.n_entities=60", f"iterate.initial_model={tiny_model_dir}", "iterate.mine_tasks=6",
        "eval.n_tasks=4", "eval.max_steps=2", "policy.params={max_tokens: 16, temperature: 1.0}",
        # the random-weight tiny model never reaches an answer, so no branch verifies: train on the
        # no-verification ablation's pairs to run the whole loop
        "cso.verify=false", "cso.k=2", "train.report_to=none", "train.max_steps=2", "train.batch_size=2",
        "train.grad_accum=1", "train.learning_rate=1e-4", "train.max_truncated_share=0",
    ])
    out = iterate.run(cfg, spark, rounds=1)
    (r0,) = out["rounds"]
    assert r0["round"] == 0 and r0["policy_version"] == "policy-v0" and r0["status"] == "trained" and r0["pairs"] > 0
    versions = {r["policy_version"]: r for r in read_table(spark, cfg, "policy_versions").collect()}
    assert set(versions) == {"policy-v0", "policy-v1"}
    v1 = versions["policy-v1"]
    assert v1["parent_version"] == "policy-v0" and v1["round"] == 0 and v1["status"] == "trained"
    assert v1["model_path"] == r0["model_path"] and v1["train_steps"] == 2 and v1["pairs"] == r0["pairs"]
    assert json.loads(v1["details"])["ref_model"] == str(tiny_model_dir)  # round 0's reference: the initial policy
    # round 0 mined the initial policy's own episodes
    trajs = read_table(spark, cfg, "trajectories").where(F.col("round") == 0)
    assert {r["policy_version"] for r in trajs.select("policy_version").distinct().collect()} == {"policy-v0"}
    # policy_evals: v0 before training, v1 (the new policy, served from its folder) after
    evals = {r["policy_version"]: r for r in read_table(spark, cfg, "policy_evals")
             .where(F.col("task_set") == "sim(seed=7)[8:12]").collect()}
    assert set(evals) == {"policy-v0", "policy-v1"}
    assert evals["policy-v1"]["policy_model"] == f"transformers:{v1['model_path']}"
    assert out["final_version"] == "policy-v1" and out["final_eval"]["rows_in"] == 4
    assert out["final_eval"]["policy_version"] == "policy-v1"
