"""Provider-backed PRM and expert through the request ledger, against the fake OpenAI-compatible server on
127.0.0.1: results, the ledger as cache (a rerun sends nothing), fault tolerance with bounded retries."""

import json
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from cso_lib.config import load_config
from cso_lib.delta_io import read_table
from cso_lib.stages import pipeline
from schemas.tables import TABLES
from tests.fakes.llm_server import FakeLLMServer

pytestmark = pytest.mark.slow

MAX_ATTEMPTS = 6


def _cfg(base, url, name):
    model = [f"base_url={url}/v1", "model=judge-1", f"max_attempts={MAX_ATTEMPTS}", "timeout_s=1.0",
             "concurrency=8", "params={temperature: 0}"]
    return load_config(None, [
        "spark.shuffle_partitions=2", f"storage.warehouse={base / name / 'wh'}", f"sim.logs_dir={base / 'logs'}",
        "sim.n_tasks=16", "sim.n_entities=60", "sim.policy_error_rate=0.35", "cso.k=3",
        *[f"prm.{x}" for x in ["provider=openai", *model]], *[f"expert.{x}" for x in ["provider=openai", *model]],
        "prices={judge-1: {input: 1.0, output: 2.0}}",
    ])


def _scores(spark, cfg):
    return {(r["trajectory_id"], r["step_idx"], r["alt_idx"]): (r["score"], r["status"])
            for r in read_table(spark, cfg, "prm_scores").collect()}


@pytest.fixture(scope="module")
def clean(spark, tmp_path_factory):
    base = tmp_path_factory.mktemp("ledger")
    with FakeLLMServer(log_path=str(base / "clean.log")) as srv:
        cfg = _cfg(base, srv.url, "clean")
        result = pipeline.run(cfg, spark)
        sends_after_first = srv.sends()
        again = cfg.model_copy(deep=True)
        again.run_id = None
        rerun = pipeline.run(again, spark, skip_ingest=True)
        yield base, cfg, result, sends_after_first, srv.sends(), rerun


def test_llm_stages_write_scores_alternatives_and_ledger(spark, clean):
    _, cfg, result, sends, _, _ = clean
    calls = read_table(spark, cfg, "llm_calls")
    ok = calls.where("status = 'ok'")
    assert result["score_policy"]["rows_out"] > 0 and result["propose"]["rows_out"] > 0
    # every request sent once; one ledger row per distinct request (the server also tells requests apart by
    # their prompt-cache key, so identical requests of two trajectories are one row here, two bodies there)
    assert max(sends.values()) == 1 and 0 < ok.count() == calls.count() <= len(sends)
    assert calls.where("input_tokens <= 0 OR output_tokens <= 0 OR cost_usd IS NULL").count() == 0
    judged = {"taxonomy"} if result["summary"]["pairs"] else set()  # the judge (the PRM's model) classifies pairs
    assert {r["stage"] for r in calls.select("stage").distinct().collect()} == {
        "score_policy", "propose", "score_alternatives", *judged}
    names = {r["prm_model"] for r in read_table(spark, cfg, "prm_scores").select("prm_model").distinct().collect()}
    assert names == {"openai:judge-1|prm-rubric/v1"}  # the stored score names the prompt version
    scores = read_table(spark, cfg, "prm_scores")
    assert scores.where("status = 'ok' AND (score < 0 OR score > 1)").count() == 0
    alts = read_table(spark, cfg, "expert_alternatives").collect()
    assert alts and all('"search"' in a["action"] for a in alts)


def test_rerun_sends_nothing(spark, clean):
    _, cfg, _, sends_first, sends_after_rerun, rerun = clean
    assert sends_after_rerun == sends_first  # not one request sent again
    assert rerun["score_policy"]["rows_out"] == 0 and rerun["propose"]["rows_out"] == 0


def test_twenty_percent_faults_same_results_bounded_retries(spark, clean):
    base, cfg_clean, _, _, _, _ = clean
    with FakeLLMServer(log_path=str(base / "faulty.log"), fault_rate=0.2, timeout_sleep_s=1.5) as srv:
        cfg = _cfg(base, srv.url, "faulty")
        cfg.run_id = "faulty-run"
        for stage in ("ingest", "select", "score_policy", "propose", "score_alternatives"):  # every PRM/expert call
            pipeline.STAGES[stage](cfg, spark)
        sends = srv.sends()
    assert _scores(spark, cfg) == _scores(spark, cfg_clean)
    assert max(sends.values()) <= MAX_ATTEMPTS and sum(sends.values()) > len(sends)  # faults were retried
    calls = read_table(spark, cfg, "llm_calls")
    assert calls.where("status != 'ok'").count() == 0
    assert calls.agg(F.max("attempts")).first()[0] > 1


def test_cost_report(spark, clean):
    from cso_lib.stages import cost

    _, cfg, result, _, _, _ = clean
    rep = cost.report(cfg, spark)
    calls = read_table(spark, cfg, "llm_calls")
    assert sum(r["calls"] for r in rep["spent"]) == calls.count()
    assert abs(sum(r["cost_usd"] for r in rep["spent"]) - calls.agg(F.sum("cost_usd")).first()[0]) < 1e-9
    judged = {"taxonomy"} if result["summary"]["pairs"] else set()
    assert {r["stage"] for r in rep["spent"]} == {"score_policy", "propose", "score_alternatives", *judged}
    # everything of the latest run is done: nothing left to pay for
    assert all(r["requests"] == 0 for r in rep["remaining"].values())
    # a new run over more trajectories would cost the average per call times what is missing
    more = cfg.model_copy(deep=True)
    more.run_id = None
    more.select.outcome = 1  # the successful trajectories: never scored
    from cso_lib.stages import select

    select.run(more, spark)
    rep = cost.report(more, spark)
    left = rep["remaining"]["score_policy"]
    assert left["requests"] > 0 and left["projected_cost_usd"] > 0 and left["projected_tokens"] > 0


KEY = "sk-cso-test-7f3a9c1e5b2d4680aa11"


def test_kill_9_mid_stage_then_rerun_pays_nothing_twice(spark, clean, tmp_path, monkeypatch):
    """kill -9 of the job while it scores; the rerun sends only what had not been answered, and the scores
    equal those of the uninterrupted run. The server demands an API key: it never reaches a log, a table, the
    journal or the Spark event log."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from cso_lib.stages import ingest, score_policy, select

    base, cfg_clean, _, _, _, _ = clean
    monkeypatch.setenv("CSO_TEST_KEY", KEY)
    events = tmp_path / "events"
    events.mkdir()
    with FakeLLMServer(log_path=str(tmp_path / "kill.log"), api_key=KEY) as srv:
        cfg = _cfg(base, srv.url, "killed")
        cfg.run_id = "killed-run"
        cfg.prm.requests_per_minute = 360  # client-side pacing (3/s per task), so the stage lasts long enough
        cfg.prm.api_key_env = "CSO_TEST_KEY"
        cfg.spark.conf = {"spark.eventLog.enabled": "true", "spark.eventLog.dir": str(events),
                          "spark.eventLog.compress": "false"}
        ingest.run(cfg, spark)
        select.run(cfg, spark)
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
        out = open(tmp_path / "job.log", "wb")  # noqa: SIM115
        job = subprocess.Popen([sys.executable, "-m", "cso_lib.cli", "score-policy", "--config", str(path)],
                               env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while sum(e["outcome"] == "ok" for e in srv.log) < 20 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert job.poll() is None, "the job finished before it could be killed"
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        answered_before = {e["hash"] for e in srv.log if e["outcome"] == "ok"}
        n_before = len(srv.log)
        assert 20 <= len(answered_before)

        # The rerun: the same stage again, in another application (the test's own Spark session, whose Python
        # workers get the key from their environment, as a cluster's executors do with spark.executorEnv),
        # without the pacing that kept the killed run going.
        monkeypatch.setitem(spark.sparkContext.environment, "CSO_TEST_KEY", KEY)
        rerun = cfg.model_copy(deep=True)
        rerun.prm.requests_per_minute = None
        rerun.spark.conf = {}
        score_policy.run(rerun, spark)
        after = srv.log[n_before:]
        runs = read_table(spark, cfg, "runs").where("stage = 'score_policy' AND run_id = 'killed-run'")
        result = json.loads(runs.orderBy(F.col("started_at").desc()).first()["details"])
    resent = {e["hash"] for e in after} & answered_before
    # Only requests in flight at the kill (answered by the server, not yet journaled) may go out again.
    assert len(resent) <= 2 * 8, resent
    assert result["ledger_rows_recovered"] >= len(answered_before) - len(resent)
    clean_policy = {k: v for k, v in _scores(spark, cfg_clean).items() if k[2] == -1}
    assert {k: v for k, v in _scores(spark, cfg).items() if k[2] == -1} == clean_policy
    assert all(e["outcome"] == "ok" for e in srv.log)  # every request carried the key

    # The key is nowhere: job output, Spark event log, journal, the config file, any table's text.
    texts = [tmp_path / "job.log", path, *events.rglob("*"), *Path(cfg.journal_path).rglob("*")]
    assert any(p.is_file() and p.stat().st_size for p in events.rglob("*")), "no event log written"
    for p in texts:
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    for name in TABLES:
        df = read_table(spark, cfg, name)
        text_cols = [f.name for f in df.schema.fields if f.dataType.simpleString() == "string"]
        if text_cols:
            hit = df.where(F.concat_ws("|", *text_cols).contains(KEY)).count()
            assert hit == 0, name
