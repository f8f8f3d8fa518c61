"""The whole pipeline on local Spark + Delta + the simulation world: results, SQL, idempotence, ablations."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from cso_lib.delta_io import read_table
from cso_lib.messages import state_at
from cso_lib.stages import build_pairs, pipeline, select
from schemas.tables import TABLES

pytestmark = pytest.mark.slow

MODEL_TABLES = ["trajectories", "steps", "prm_scores", "expert_alternatives", "branch_rollouts", "critical_steps"]


@pytest.fixture(scope="module")
def run(sim_pipeline):
    """The session's simulated pipeline run (tests/conftest.py: 40 tasks), this module's own copy."""
    cfg, result, _ = sim_pipeline
    return cfg, result


def _counts(spark, cfg):
    return {name: read_table(spark, cfg, name).count() for name in TABLES}


def test_end_to_end_results(spark, run):
    cfg, result = run
    s = result["summary"]
    assert result["ingest"]["read"] == 40 == result["ingest"]["accepted"]
    assert s["trajectories"] == result["select"]["selected"] > 0
    assert s["steps"] > s["candidates"] > 0 and s["pairs"] > 0
    assert s["precision"] == 1.0  # verified pairs are real fixes
    assert 0 < s["recall"] <= 1 and 0 < s["share_steps_supervised"] < 1
    assert s["rollouts"] == result["rollouts"]["rows_out"] and s["rollout_successes"] >= s["pairs"]
    # every stage recorded its run
    stages = {r["stage"] for r in read_table(spark, cfg, "runs").where(F.col("run_id") == cfg.run_id).collect()}
    assert set(pipeline.STAGES) <= stages
    written = json.loads((Path(cfg.storage.warehouse) / "_summaries" / f"{cfg.run_id}.json").read_text())
    assert written["summary"]["pairs"] == s["pairs"]


def test_spark_sql_over_the_delta_tables(spark, run):
    cfg, result = run
    path = cfg.storage.table("critical_steps")
    rows = spark.sql(f"SELECT * FROM delta.`{path}`").collect()
    assert len(rows) == result["summary"]["pairs"]
    why = spark.sql(
        f"SELECT is_candidate, count(*) n FROM delta.`{cfg.storage.table('critical_candidates')}` GROUP BY 1"
    ).collect()
    assert {r["is_candidate"] for r in why} == {True, False}


def test_dpo_pairs_are_trl_conversational_records(spark, run):
    cfg, result = run
    table = pq.read_table(f"{cfg.storage.pairs_path}/round=0")
    assert table.num_rows == result["summary"]["pairs"]
    rows = table.to_pylist()
    steps = {(r["trajectory_id"], r["step_idx"]): r for r in read_table(spark, cfg, "steps").collect()}
    traj = {r["trajectory_id"]: r for r in read_table(spark, cfg, "trajectories").collect()}
    for row in rows:
        assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
        assert row["chosen"][0]["tool_calls"] and row["verified"] and row["r_policy"] < 0.45 < 0.65 < row["r_expert"]
        # the prompt is s_t exactly: preamble + every earlier step, rebuilt here from the tables
        t = row["step_idx"]
        tr = traj[row["trajectory_id"]]
        earlier = [(json.loads(steps[(row["trajectory_id"], i)]["action"]),
                    json.loads(steps[(row["trajectory_id"], i)]["observations"])) for i in range(t)]
        expected = state_at(json.loads(tr["preamble"]), earlier, t)
        assert [m["role"] for m in row["prompt"]] == [m["role"] for m in expected]
        assert [m["content"] for m in row["prompt"]] == [m.get("content") for m in expected]
        assert row["rejected"][0]["tool_calls"][0]["function"]["arguments"] == json.loads(
            steps[(row["trajectory_id"], t)]["action"])["tool_calls"][0]["function"]["arguments"]


def _versions(spark, cfg, names):
    from delta.tables import DeltaTable

    return {n: DeltaTable.forPath(spark, cfg.storage.table(n)).history(1).first()["version"] for n in names}


def test_rerun_adds_nothing_and_calls_nothing(spark, run):
    cfg, _ = run
    before = _counts(spark, cfg)
    mined = ["prm_scores", "expert_alternatives", "critical_candidates", "branch_rollouts", "critical_steps"]
    versions = _versions(spark, cfg, mined)
    again = pipeline.run(cfg.model_copy(deep=True), spark)
    after = _counts(spark, cfg)
    assert _versions(spark, cfg, mined) == versions  # nothing to do: no stage committed to these tables
    assert {k: after[k] for k in MODEL_TABLES + ["work_set", "quarantine", "critical_candidates"]} == {
        k: before[k] for k in MODEL_TABLES + ["work_set", "quarantine", "critical_candidates"]}
    assert again["ingest"]["new"] == 0
    for stage in ("score_policy", "propose", "score_alternatives", "rollouts", "build_pairs"):
        assert again[stage]["rows_out"] == 0, stage
    # A new run over the same logs selects the same trajectories and pays for nothing again.
    fresh = cfg.model_copy(deep=True)
    fresh.run_id = None
    sel = select.run(fresh, spark)
    assert sel["selected"] == again["select"]["selected"] and sel["run_id"] != cfg.run_id
    assert _counts(spark, cfg)["prm_scores"] == before["prm_scores"]


def test_select_filters(spark, run):
    cfg, _ = run
    failed = read_table(spark, cfg, "trajectories").where("outcome = 0").count()

    def selected(**fields):
        c = cfg.model_copy(deep=True)
        c.run_id = None
        for name, value in fields.items():
            setattr(c.select, name, value)
        return select.run(c, spark)["selected"]

    assert selected(limit=5) == 5
    assert selected(policy_version="nope") == 0
    assert selected(outcome=1) == 40 - failed
    half = selected(sample_fraction=0.5, seed=1)
    assert 0 < half < failed and half == selected(sample_fraction=0.5, seed=1)  # seeded: the same sample


def test_no_verify_ablation_and_paper_order(spark, run):
    cfg, result = run
    verified = result["summary"]
    nv = cfg.model_copy(deep=True)
    nv.cso.verify = False
    out = pipeline.run(nv, spark, skip_ingest=True)
    s = out["summary"]
    assert out["rollouts"] == {"skipped": "cso.verify is false"}
    assert s["pairs"] >= verified["pairs"] and s["precision"] <= 1.0
    unverified = pq.read_table(f"{build_pairs.pairs_path(nv)}/round=0")
    assert unverified.num_rows == s["pairs"] and not any(unverified.column("verified").to_pylist())
    # the verified dataset is untouched by the ablation
    assert pq.read_table(f"{cfg.storage.pairs_path}/round=0").num_rows == verified["pairs"]

    cands = lambda: {(r["trajectory_id"], r["step_idx"]) for r in  # noqa: E731
                     read_table(spark, cfg, "critical_candidates").where("is_candidate").collect()}
    before, alts_before = cands(), read_table(spark, cfg, "expert_alternatives").count()
    paper = cfg.model_copy(deep=True)
    paper.cso.order = "paper"
    out = pipeline.run(paper, spark, skip_ingest=True)
    assert out["propose"]["steps_asked"] > 0 and read_table(spark, cfg, "expert_alternatives").count() > alts_before
    assert cands() == before  # PRM-first finds exactly the paper order's candidates
