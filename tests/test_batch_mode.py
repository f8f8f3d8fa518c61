"""Batch mode of the offline stages (`<role>.batch: true`) against the fake server's OpenAI Batch and Anthropic
Message Batches endpoints: results equal the online path's at the batch price, a killed job resumes polling
its batch instead of submitting again, expired requests are resubmitted a bounded number of times, and the
API key never reaches a log, a table or the Spark event log."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pyspark.sql import functions as F

from cso_lib.config import load_config
from cso_lib.delta_io import read_table
from cso_lib.errors import StageError
from cso_lib.llm import Usage, cost_usd
from cso_lib.llm_models import DEFERRED_ERROR
from cso_lib.stages import ingest, propose, score_policy, select, simulate
from schemas.tables import TABLES
from tests.fakes.llm_server import FakeLLMServer

pytestmark = pytest.mark.slow

PRICES = {"judge-1": {"input": 1.0, "output": 2.0}}
KEY = "sk-cso-batch-test-4d2e8b1c9a7f3605"


def _cfg(base, url, name, *, batch, provider="openai", roles=("prm", "expert")):
    model = [f"provider={provider}", f"base_url={url}/v1" if provider == "openai" else f"base_url={url}",
             "model=judge-1", "max_attempts=4", "timeout_s=5", "concurrency=8", "params={temperature: 0}"]
    if batch:
        model += ["batch=true", "batch_poll_s=0.05", "batch_wait_s=60"]
    return load_config(None, [
        "spark.shuffle_partitions=2", f"storage.warehouse={base / name / 'wh'}", f"sim.logs_dir={base / 'logs'}",
        "sim.n_tasks=8", "sim.n_entities=60", "sim.policy_error_rate=0.35", "cso.k=3", f"run_id={name}",
        *[f"{role}.{x}" for role in roles for x in model], f"prices={json.dumps(PRICES)}",
    ])


def _mine(cfg, spark):
    for stage in (ingest, select, score_policy, propose):  # score_alternatives shares score_policy's path
        stage.run(cfg, spark)


def _scores(spark, cfg):
    return {(r["trajectory_id"], r["step_idx"], r["alt_idx"]): (r["score"], r["status"])
            for r in read_table(spark, cfg, "prm_scores").collect()}


def _alts(spark, cfg):
    return {(r["trajectory_id"], r["step_idx"], r["alt_idx"]): r["action"]
            for r in read_table(spark, cfg, "expert_alternatives").collect()}


def _costs(spark, cfg):
    return {r["request_hash"]: r for r in read_table(spark, cfg, "llm_calls").collect()}


@pytest.fixture(scope="module")
def runs(spark, tmp_path_factory):
    """The same stages online and in batch mode (each against its own fresh server)."""
    base = tmp_path_factory.mktemp("batch")
    with FakeLLMServer() as srv:
        online = _cfg(base, srv.url, "online", batch=False)
        simulate.run(online, spark)  # the logs every test here ingests
        _mine(online, spark)
    with FakeLLMServer() as srv:
        batch = _cfg(base, srv.url, "batch", batch=True)
        _mine(batch, spark)
        log_first = list(srv.log)
        rerun = score_policy.run(batch, spark)
        log_rerun = srv.log[len(log_first):]
    return base, online, batch, log_first, log_rerun, rerun


def test_batch_mode_gives_the_online_results_at_the_batch_price(spark, runs):
    _, online, batch, log, log_rerun, rerun = runs
    assert _scores(spark, batch) == _scores(spark, online) and len(_scores(spark, online)) > 10
    assert _alts(spark, batch) == _alts(spark, online) and _alts(spark, online)
    assert not [e for e in log if e["path"].endswith("/chat/completions")]  # nothing was sent online
    created = [e for e in log if e["path"] == "/v1/batches" and e["outcome"] == "created"]
    assert len(created) == 2  # score_policy, propose: one batch each

    calls_online, calls_batch = _costs(spark, online), _costs(spark, batch)
    assert calls_batch and set(calls_batch) <= set(calls_online)
    for h, row in calls_batch.items():
        assert row["batch"] and row["status"] == "ok"
        usage = Usage(row["input_tokens"], row["cached_input_tokens"], row["cache_write_tokens"], row["output_tokens"])
        assert row["cost_usd"] == pytest.approx(cost_usd("judge-1", usage, PRICES, batch=True))
        assert row["cost_usd"] == pytest.approx(calls_online[h]["cost_usd"] / 2)  # same tokens, half the price

    from cso_lib.stages import cost

    spent = cost.report(batch, spark)["spent"]
    assert sum(r["batch_calls"] for r in spent) == sum(r["calls"] for r in spent) == len(calls_batch)
    assert sum(r["list_cost_usd"] for r in spent) == pytest.approx(2 * sum(r["cost_usd"] for r in spent))

    batches = read_table(spark, batch, "llm_batches").collect()
    assert len(batches) == 2 and all(b["collected"] and b["status"] == "completed" for b in batches)
    assert sum(b["n_ok"] for b in batches) == len(calls_batch) == sum(b["n_requests"] for b in batches)
    # a rerun asks nothing: every answer is in the ledger, no batch is submitted or polled
    assert log_rerun == [] and rerun["rows_out"] == 0 and rerun.get("batches_submitted", 0) == 0


def test_expired_requests_are_resubmitted_a_bounded_number_of_times(spark, runs):
    """Anthropic Message Batches: the job stops waiting (batch_wait_s) and a rerun resumes polling the stored
    batch; 30% of requests expire and 10% fail per submission: they are resubmitted once, and those that fail
    twice are stored unscored, never sent online."""
    base, _, _, _, _, _ = runs
    with FakeLLMServer(batch_expire_rate=0.3, batch_error_rate=0.1, seed=3, batch_polls=10**6) as srv:
        cfg = _cfg(base, srv.url, "expiring", batch=True, provider="anthropic", roles=("prm",))
        cfg.prm.batch_wait_s = 0.5
        ingest.run(cfg, spark)
        select.run(cfg, spark)
        with pytest.raises(StageError, match="rerun the stage"):
            score_policy.run(cfg, spark)
        first = read_table(spark, cfg, "llm_batches").collect()
        assert len(first) == 1 and not first[0]["collected"]

        srv.batch_polls = 1
        cfg.prm.batch_wait_s = 60
        stats = score_policy.run(cfg, spark)
        created = [b for b in srv.batches.values() if b.get("type") == "message_batch"]
        submits = srv.batch_submits
    assert not [e for e in srv.log if e["path"] == "/v1/messages"]  # nothing online
    assert stats["batches_resumed"] == 1 and created[0]["id"] == first[0]["batch_id"]
    assert len(created) == 2 == stats["batches_submitted"] + 1  # the resumed one, then one of resubmissions
    assert max(submits.values()) == 2 and stats["batch_resubmitted"] == sum(n == 2 for n in submits.values())

    scores = read_table(spark, cfg, "prm_scores").where("alt_idx = -1").collect()
    unscored = [r for r in scores if r["status"] != "ok"]
    assert 0 < len(unscored) < len(scores) and stats["batch_given_up"] == len(unscored)
    assert all(DEFERRED_ERROR in r["reasoning"] for r in unscored)
    calls = read_table(spark, cfg, "llm_calls")
    assert calls.where("status != 'ok'").count() == len(unscored) and calls.where("NOT batch").count() == 0
    batches = read_table(spark, cfg, "llm_batches").collect()
    assert all(b["collected"] for b in batches)
    assert sum(b["n_resubmit"] for b in batches) == stats["batch_resubmitted"] + len(unscored)


def test_kill_9_after_submit_then_rerun_polls_the_same_batch(spark, runs, tmp_path, monkeypatch):
    """kill -9 of `cso score-policy` once its batch is submitted (the driver polls it); the rerun resumes
    polling that batch id, submits nothing, and gives the online scores. The key is nowhere to be found."""
    base, online, _, _, _, _ = runs
    monkeypatch.setenv("CSO_BATCH_KEY", KEY)
    events = tmp_path / "events"
    events.mkdir()
    with FakeLLMServer(api_key=KEY, batch_polls=10**6) as srv:
        cfg = _cfg(base, srv.url, "killed", batch=True, roles=("prm",))
        cfg.prm.api_key_env = "CSO_BATCH_KEY"
        cfg.spark.conf = {"spark.eventLog.enabled": "true", "spark.eventLog.dir": str(events),
                          "spark.eventLog.compress": "false"}
        ingest.run(cfg, spark)
        select.run(cfg, spark)
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
        with open(tmp_path / "job.log", "wb") as out:
            job = subprocess.Popen([sys.executable, "-m", "cso_lib.cli", "score-policy", "--config", str(path)],
                                   env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 900  # ~20 s on a quiet machine; far more on a shared one
            while not any(e["outcome"] == "poll" for e in srv.log) and time.monotonic() < deadline \
                    and job.poll() is None:
                time.sleep(0.1)
            assert job.poll() is None, "the job ended before it could be killed"
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        created = [e["hash"] for e in srv.log if e["outcome"] == "created"]
        assert len(created) == 1

        srv.batch_polls = 0  # the provider finishes the batch; the rerun must find it, not submit another
        # The rerun: the same stage in another application (the test's own Spark session; the key in its
        # workers' environment too, as a cluster's executors have it).
        monkeypatch.setitem(spark.sparkContext.environment, "CSO_BATCH_KEY", KEY)
        rerun = cfg.model_copy(deep=True)
        rerun.spark.conf = {}
        score_policy.run(rerun, spark)
        assert [e["hash"] for e in srv.log if e["outcome"] == "created"] == created  # one batch, ever
        assert not [e for e in srv.log if e["path"].endswith("/chat/completions")]
    batches = read_table(spark, cfg, "llm_batches").collect()
    assert [(b["batch_id"], b["collected"]) for b in batches] == [(created[0], True)]
    online_policy = {k: v for k, v in _scores(spark, online).items() if k[2] == -1}
    assert _scores(spark, cfg) == online_policy

    # The key is nowhere: job output, Spark event log, journals, the config file, any table's text.
    texts = [tmp_path / "job.log", path, *events.rglob("*"), *Path(cfg.journal_path).rglob("*")]
    assert any(p.is_file() and p.stat().st_size for p in events.rglob("*")), "no event log written"
    for p in texts:
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    for name in TABLES:
        df = read_table(spark, cfg, name)
        cols = [F.col(f.name).cast("string") for f in df.schema.fields]
        assert df.where(F.concat_ws("|", *cols).contains(KEY)).count() == 0, name
