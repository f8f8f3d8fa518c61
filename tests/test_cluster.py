"""The pipeline as its users run it: spark-submit to a real Spark standalone cluster (a master and two workers
on 127.0.0.1); new logs land and the next scheduled run (another application: the test's own Spark session)
processes only them (incremental runs); then the analyst notebook, executed headless against the warehouse
those runs wrote."""

import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pyspark
import pytest
import yaml
from pyspark.sql import functions as F

from cso_lib.config import load_config
from cso_lib.delta_io import read_table
from cso_lib.stages import pipeline
from tests.fakes.log_batches import SIM_SETTINGS, failed, write_batch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SPARK_BIN = Path(pyspark.__file__).parent / "bin"  # pip's pyspark: spark-class and spark-submit, no sbin scripts
SUBMIT_TIMEOUT_S = int(os.environ.get("CSO_TEST_SUBMIT_TIMEOUT_S", "900"))  # one pipeline run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{path.read_text(errors='replace')}")
        time.sleep(0.5)
    raise TimeoutError(f"no {text!r} in {path} after {timeout} s:\n{path.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A standalone master and two workers (1 core, 1 GiB each), stopped afterwards."""
    base = tmp_path_factory.mktemp("standalone")
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "SPARK_WORKER_DIR": str(base / "work"), "SPARK_LOG_DIR": str(base / "logs")}
    port = _free_port()
    url = f"spark://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name, *args):
        log = base / f"{name}.log"
        logs.append(log)
        procs.append(subprocess.Popen([str(SPARK_BIN / "spark-class"), *args], env=env, cwd=base,
                                      stdout=log.open("wb"), stderr=subprocess.STDOUT))
        return procs[-1], log

    try:
        master, mlog = start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                             "--port", str(port), "--webui-port", str(_free_port()))
        _wait_for(mlog, "I have been elected leader", master)
        for i in (1, 2):
            w, wlog = start(f"worker{i}", "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                            "--cores", "1", "--memory", "1g", "--webui-port", str(_free_port()))
            _wait_for(wlog, "Successfully registered with master", w)
        yield {"url": url, "base": base, "env": env, "logs": logs}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _package(dest: Path) -> Path:
    """The code shipped to the executors with --py-files, as a user ships a wheel."""
    out = dest / "cso_code.zip"
    with zipfile.ZipFile(out, "w") as z:
        for pkg in ("cso_lib", "schemas"):
            for f in (ROOT / pkg).rglob("*"):
                if f.is_file() and "__pycache__" not in f.parts:
                    z.write(f, f.relative_to(ROOT))
    return out


def _submit(cluster, config: Path, *args: str) -> str:
    events = cluster["base"] / "events"
    events.mkdir(exist_ok=True)
    env = {**cluster["env"], "CSO_PY_FILES": str(_package(cluster["base"])),
           "CSO_SUBMIT_ARGS": " ".join([
               "--driver-memory 1g --executor-memory 512m --executor-cores 1 --total-executor-cores 2",
               "--conf spark.eventLog.enabled=true", f"--conf spark.eventLog.dir=file://{events}",
               # one plain JSON-lines file per application (Spark 4 defaults: rolling, zstd-compressed)
               "--conf spark.eventLog.rolling.enabled=false", "--conf spark.eventLog.compress=false",
               "--conf spark.ui.enabled=false",
               "--conf spark.default.parallelism=2"]),
           "SPARK_SUBMIT": str(SPARK_BIN / "spark-submit")}
    proc = subprocess.run([str(ROOT / "infra" / "submit-standalone.sh"), cluster["url"], str(config), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S)
    assert proc.returncode == 0, f"spark-submit failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _events(cluster, app_id: str) -> list[dict]:
    log = next((cluster["base"] / "events").glob(f"{app_id}*"))
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(spark, cluster):
    """Two scheduled runs, both incremental: batch A lands, run 1 (spark-submit to the cluster); batch B lands,
    run 2 (another application over the same warehouse: the test session's local Spark, which saves a second
    cluster application of a few minutes; what is cluster-specific is checked on run 1)."""
    base = cluster["base"]
    logs = base / "agent_logs"
    config = base / "cso.yaml"
    config.write_text(yaml.safe_dump({
        "spark": {"master": None, "shuffle_partitions": 2},
        "storage": {"warehouse": str(base / "warehouse")},
        "ingest": {"paths": [str(logs)]},
        "select": {"incremental": True},
    }))
    out = {"config": config, "A": write_batch(logs, "day1.jsonl", 0, 10)}
    t0 = time.monotonic()
    sets = [a for s in SIM_SETTINGS for a in ("--set", s)]
    out["log1"] = _submit(cluster, config, "--run-id", "day-1", "--no-exports", *sets)
    out["B"] = write_batch(logs, "day2.jsonl", 10, 20)  # the next day's logs land
    cfg = load_config(config, SIM_SETTINGS)
    cfg.spark.master = "local[2]"
    cfg.run_id = "day-2"
    pipeline.run(cfg, spark)
    out["seconds"] = time.monotonic() - t0
    out["cfg"] = load_config(config, SIM_SETTINGS)
    return out


def _by_run(spark, cfg, table, run_id, col="trajectory_id"):
    return {r[col] for r in read_table(spark, cfg, table).where(F.col("run_id") == run_id).select(col).collect()}


def test_submitted_pipeline_runs_on_the_standalone_cluster(spark, cluster, runs):
    cfg = runs["cfg"]
    # the application ran on the cluster's two workers
    apps = [p.name for p in (cluster["base"] / "events").iterdir()]
    assert len(apps) == 1 and all(a.startswith("app-") for a in apps)
    first = _events(cluster, sorted(apps)[0])
    executors = {e["Executor ID"] for e in first if e["Event"] == "SparkListenerExecutorAdded"}
    assert len(executors) == 2
    # and wrote its results to Delta
    stages = {r["stage"] for r in read_table(spark, cfg, "runs").where(F.col("run_id") == "day-1").collect()}
    assert {"ingest", "select", "score_policy", "propose", "score_alternatives", "rollouts", "build_pairs",
            "pipeline"} <= stages
    pairs = read_table(spark, cfg, "critical_steps").where("verified")
    assert pairs.count() > 0
    assert _by_run(spark, cfg, "work_set", "day-1") == failed(runs["A"])


def test_second_run_processes_only_the_new_trajectories(spark, runs):
    cfg = runs["cfg"]
    new_b = set(runs["B"])
    assert _by_run(spark, cfg, "work_set", "day-2") == failed(runs["B"])
    for table in ("prm_scores", "critical_candidates"):  # every model call of run 2 was about B
        touched = _by_run(spark, cfg, table, "day-2")
        assert touched and touched <= new_b
    details = {r["stage"]: json.loads(r["details"]) for r in
               read_table(spark, cfg, "runs").where(F.col("run_id") == "day-2").collect()}
    assert details["ingest"]["new"] == len(runs["B"]) and details["ingest"]["already_present"] == len(runs["A"])
    assert details["select"]["rows_in"] == len(runs["B"])  # the change feed held B only
    assert details["select"]["since_version"] == json.loads(
        read_table(spark, cfg, "runs").where("run_id = 'day-1' AND stage = 'select'").first()["details"]
    )["trajectories_version"]


def test_jobs_log_and_name_their_stages(cluster, runs):
    log = runs["log1"]
    for stage in ("ingest", "select", "score_policy", "rollouts", "build_pairs", "pipeline"):
        assert f"stage={stage} run_id=day-1 rows_in=" in log, stage
    assert "seconds=" in log
    app = sorted(p.name for p in (cluster["base"] / "events").iterdir())[0]
    descriptions = {e["Properties"].get("spark.job.description") for e in _events(cluster, app)
                    if e["Event"] == "SparkListenerJobStart"}
    for stage in ("ingest", "select", "score_policy", "propose", "score_alternatives", "rollouts", "build_pairs"):
        assert f"cso {stage} (day-1)" in descriptions, (stage, descriptions)


def test_notebook_runs_headless_and_draws_its_plots(spark, runs, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    cfg = runs["cfg"]
    figures = tmp_path / "figures"
    nb = nbformat.read(ROOT / "notebooks" / "critical_steps.ipynb", as_version=4)
    env = {"CSO_WAREHOUSE": cfg.storage.warehouse, "CSO_FIGURES": str(figures)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for name in ("critical_step_positions.png", "error_categories.png", "prm_scores.png", "cost_per_pair.png"):
        png = figures / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
    found = json.loads((figures / "findings.json").read_text())
    verified = read_table(spark, cfg, "critical_steps").where("verified")
    assert found["verified_pairs"] == verified.count() > 0
    assert sum(found["error_categories"].values()) == found["critical_steps"] == \
        verified.select("trajectory_id", "step_idx").distinct().count()
    assert found["prm_judgements"] == read_table(spark, cfg, "prm_scores").count()
    assert found["ledger_rows"] == read_table(spark, cfg, "llm_calls").count()
