"""Baseline datasets (Step-DPO, ETO, RFT): the pure builders, then one pipeline run's Parquet outputs.

The Spark part takes its copy of the session's simulated pipeline run (tests/conftest.py, 40 tasks) plus the
tau-bench sample ingested next to it (ETO's logged pairs need tasks with both a success and a failure,
which the simulation, one trajectory per task, never has), then runs the baselines stage once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from cso_lib.baselines import branch_conversation, conversation, eto_pair, rft_record, step_dpo_pairs
from cso_lib.messages import assistant, call, to_struct

TAU = Path("/work/shared/data/tau-bench-airline/gpt-4o-airline.json")
PRE = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]


def _step(i: int, content: str = "") -> tuple[dict, list[dict]]:
    return (assistant(content or f"a{i}", [call(f"c{i}", "search", {"query": str(i)})]),
            [{"role": "tool", "tool_call_id": f"c{i}", "content": f"r{i}"}])


# ---- pure ------------------------------------------------------------------------------------------
def test_step_dpo_picks_the_best_alternative_above_the_policy():
    steps = [_step(0), _step(1), _step(2)]
    alt = lambda j: assistant(f"alt{j}")  # noqa: E731
    scores = [
        {"step_idx": 0, "alt_idx": -1, "score": 0.5, "action": None},
        {"step_idx": 0, "alt_idx": 0, "score": 0.5, "action": alt(0)},  # not above the policy: no pair
        {"step_idx": 1, "alt_idx": -1, "score": 0.2, "action": None},
        {"step_idx": 1, "alt_idx": 0, "score": 0.6, "action": alt(0)},
        {"step_idx": 1, "alt_idx": 1, "score": 0.9, "action": alt(1)},
        {"step_idx": 1, "alt_idx": 2, "score": 0.9, "action": alt(2)},  # tie: the lower alt_idx wins
        {"step_idx": 2, "alt_idx": -1, "score": None, "action": None},  # unscored policy action: no pair
        {"step_idx": 2, "alt_idx": 0, "score": 0.9, "action": alt(0)},
    ]
    (pair,) = step_dpo_pairs(PRE, steps, scores)
    assert (pair["step_idx"], pair["alt_idx"], pair["r_policy"], pair["r_expert"]) == (1, 1, 0.2, 0.9)
    assert pair["prompt"] == conversation(PRE, steps[:1])
    assert pair["chosen"] == [alt(1)] and pair["rejected"] == [steps[1][0]]
    assert step_dpo_pairs(PRE, steps, scores, margin=0.75) == []


def test_eto_pair_shares_only_the_common_preamble():
    failed = conversation(PRE, [_step(0), _step(1)])
    other_user = [PRE[0], {"role": "user", "content": "q, worded differently"}]
    success = conversation(other_user, [_step(0, "better")])
    pair = eto_pair(success, failed)
    assert pair["prompt"] == PRE[:1]  # the system prompt only: the user turns differ
    assert pair["chosen"] == success[1:] and pair["rejected"] == failed[1:]
    assert eto_pair(failed, failed) is None
    assert eto_pair(conversation([{"role": "system", "content": "x"}], [_step(0)]), failed) is None


def test_branch_conversation_and_eto_pair_from_a_rollout():
    steps = [_step(0), _step(1), _step(2)]
    continuation = [*_step(9, "the fix"), *_step(10)]
    continuation = [continuation[0], *continuation[1], continuation[2], *continuation[3]]
    fixed = branch_conversation(PRE, steps, 1, continuation)
    assert fixed == conversation(PRE, steps[:1]) + continuation
    pair = eto_pair(fixed, conversation(PRE, steps))
    assert pair["prompt"] == PRE and pair["chosen"][2]["content"] == "the fix"
    assert rft_record(PRE, steps) == {"messages": conversation(PRE, steps)}


# ---- Spark -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(spark, sim_pipeline):
    from cso_lib.stages import baselines, ingest

    cfg, _, _ = sim_pipeline  # the session's simulated pipeline run (tests/conftest.py), this module's copy

    def fresh(**ingest_fields):
        c = cfg.model_copy(deep=True)
        c.run_id = None
        for name, value in ingest_fields.items():
            setattr(c.ingest, name, value)
        return c

    if TAU.exists():
        ingest.run(fresh(paths=[str(TAU)]), spark)
    stats = baselines.run(fresh(), spark)
    return cfg, stats


def _read(spark, cfg, name):
    from cso_lib.stages.baselines import baselines_path

    return spark.read.parquet(baselines_path(cfg, name)).where(F.col("round") == cfg.round)


def _tables(spark, cfg):
    from cso_lib.delta_io import read_table

    return lambda name: read_table(spark, cfg, name)  # noqa: E731


def _msgs(row_messages) -> list[dict]:
    return [m.asDict(recursive=True) for m in row_messages]


def _conversation_of(table, trajectory_id):
    traj = table("trajectories").where(F.col("trajectory_id") == trajectory_id).first()
    steps = table("steps").where(F.col("trajectory_id") == trajectory_id).orderBy("step_idx").collect()
    parsed = [(json.loads(s["action"]), json.loads(s["observations"])) for s in steps]
    return json.loads(traj["preamble"]), parsed


@pytest.mark.slow
def test_step_dpo_dataset(spark, built):
    from schemas.tables import DPO_PAIRS

    cfg, stats = built
    table = _tables(spark, cfg)
    df = _read(spark, cfg, "step_dpo")
    assert df.columns == [f.name for f in DPO_PAIRS.fields]
    # independent count: steps whose best scored alternative beats the policy's score
    scores = table("prm_scores").where(F.col("status") == "ok")
    pol = scores.where("alt_idx = -1").select("trajectory_id", "step_idx", F.col("score").alias("rp"))
    best = scores.where("alt_idx >= 0").groupBy("trajectory_id", "step_idx").agg(F.max("score").alias("rb"))
    expected = pol.join(best, ["trajectory_id", "step_idx"]).where("rb > rp").count()
    assert stats["step_dpo_pairs"] == df.count() == expected > 0
    rows = df.collect()
    assert all(r["r_expert"] > r["r_policy"] and not r["verified"] and r["verifier"] == "none" for r in rows)
    assert all(len(r["chosen"]) == len(r["rejected"]) == 1 and r["chosen"][0]["role"] == "assistant" for r in rows)
    # every CSO pair's step is also a Step-DPO step (CSO adds thresholds and verification on top)
    cso = {(r["trajectory_id"], r["step_idx"]) for r in spark.read.parquet(cfg.storage.pairs_path).collect()}
    assert cso and cso <= {(r["trajectory_id"], r["step_idx"]) for r in rows}
    # the prompt is exactly s_t, the rejected action the logged one
    r = rows[0]
    preamble, steps = _conversation_of(table, r["trajectory_id"])
    t = r["step_idx"]
    assert _msgs(r["prompt"]) == [to_struct(m) for m in conversation(preamble, steps[:t])]
    assert _msgs(r["rejected"]) == [to_struct(steps[t][0])]


@pytest.mark.slow
def test_eto_dataset(spark, built):
    cfg, stats = built
    table = _tables(spark, cfg)
    df = _read(spark, cfg, "eto")
    traj = table("trajectories").where(F.col("round") == cfg.round)
    won = traj.where("outcome = 1").select("task_id", "env").distinct()
    failed = traj.where("outcome = 0")
    expected_logged = failed.join(won, ["task_id", "env"], "left_semi").count()
    expected_branch = (table("branch_rollouts").where("success").select("trajectory_id").distinct()
                       .join(failed, "trajectory_id", "left_semi").count())
    by_source = {r["source"]: r["count"] for r in df.groupBy("source").count().collect()}
    assert by_source.get("branch_rollout", 0) == expected_branch > 0
    assert by_source.get("logged", 0) == expected_logged
    if TAU.exists():
        assert expected_logged > 0
    assert stats["eto_pairs"] == df.count() == expected_logged + expected_branch
    rows = df.collect()
    logged = [r for r in rows if r["source"] == "logged"]
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in logged if r["rejected_reward"] is not None)
    assert all(r["chosen_trajectory_id"] == r["rejected_trajectory_id"] for r in rows if r["source"] != "logged")
    assert all(r["prompt"] and r["chosen"] and r["rejected"] for r in rows)
    # a branch pair: prompt = preamble, rejected = the whole failed run, chosen = s_t + the verified branch
    b = next(r for r in rows if r["source"] == "branch_rollout")
    preamble, steps = _conversation_of(table, b["rejected_trajectory_id"])
    t = b["branch_step_idx"]
    assert _msgs(b["prompt"]) == [to_struct(m) for m in preamble]
    assert _msgs(b["rejected"]) == [to_struct(m) for m in conversation([], steps)]
    fixed = _msgs(b["chosen"])
    assert fixed[: len(conversation([], steps[:t]))] == [to_struct(m) for m in conversation([], steps[:t])]
    alt = table("expert_alternatives").where(
        (F.col("trajectory_id") == b["rejected_trajectory_id"]) & (F.col("step_idx") == t)
        & (F.col("alt_idx") == b["branch_alt_idx"])).first()
    assert fixed[len(conversation([], steps[:t]))] == to_struct(json.loads(alt["action"]))


@pytest.mark.slow
def test_rft_dataset(spark, built):
    cfg, stats = built
    table = _tables(spark, cfg)
    df = _read(spark, cfg, "rft")
    won = table("trajectories").where((F.col("round") == cfg.round) & (F.col("outcome") == 1))
    assert stats["rft_records"] == df.count() == won.count() > 0
    assert {r["trajectory_id"] for r in df.select("trajectory_id").collect()} == {
        r["trajectory_id"] for r in won.select("trajectory_id").collect()}
    r = df.orderBy("trajectory_id").first()
    preamble, steps = _conversation_of(table, r["trajectory_id"])
    assert _msgs(r["messages"]) == [to_struct(m) for m in conversation(preamble, steps)]
    assert r["n_steps"] == len(steps)
