"""The cluster and scheduler definitions under infra/: they parse, name files that exist, pass configs cso
accepts, and the GPU discovery script speaks Spark's format. (No Docker engine, Databricks workspace or
Airflow here: the definitions are checked statically; Airflow is replaced by a recording stand-in.)"""

import ast
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from cso_lib.config import load_config

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
STAGE_JOBS = {"ingest", "select", "score_policy", "propose", "score_alternatives", "rollouts", "build_pairs",
              "taxonomy", "pipeline", "housekeeping"}


def _spark_conf(path: Path) -> dict[str, str]:
    conf = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf[key] = value.strip()
    return conf


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in INFRA.rglob("*.y*ml")))
def test_every_yaml_file_parses(path):
    docs = list(yaml.safe_load_all((ROOT / path).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", ["infra/local.yaml", "infra/cluster.example.yaml", "infra/k8s.yaml",
                                  "infra/databricks/cso.yaml"])
def test_cso_configs_are_valid(path):
    cfg = load_config(ROOT / path)
    if path != "infra/local.yaml":
        assert cfg.spark.master is None  # spark-submit / the platform decides


def test_k8s_config_puts_rollouts_on_a_gpu_pool():
    cfg = load_config(INFRA / "k8s.yaml")
    assert cfg.rollouts.gpus_per_task == 1 and cfg.rollouts.executor_gpus == 1 and cfg.select.incremental
    assert cfg.rollouts.gpu_discovery_script == "/opt/cso/infra/gpu-discovery.sh"
    conf = _spark_conf(INFRA / "spark" / "k8s.conf")
    assert conf["spark.dynamicAllocation.enabled"] == "true"  # separate executors for a ResourceProfile
    assert conf["spark.dynamicAllocation.shuffleTracking.enabled"] == "true"
    assert conf["spark.executor.resource.gpu.vendor"] == "nvidia.com"
    for key in ("spark.kubernetes.driver.podTemplateFile", "spark.kubernetes.executor.podTemplateFile"):
        template = yaml.safe_load((ROOT / conf[key]).read_text())
        assert template["kind"] == "Pod"
    executor = yaml.safe_load((ROOT / conf["spark.kubernetes.executor.podTemplateFile"]).read_text())
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in executor["spec"]["tolerations"]
    # the image the Dockerfile builds puts the discovery script where the configs say
    assert "COPY infra infra" in (INFRA / "Dockerfile").read_text() and "WORKDIR /opt/cso" in (
        INFRA / "Dockerfile").read_text()


def test_spark_conf_files_parse_with_delta_set():
    for name in ("standalone.conf", "yarn.conf", "k8s.conf"):
        conf = _spark_conf(INFRA / "spark" / name)
        assert conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension", name
        assert "spark.redaction.regex" in conf, name
    yarn = _spark_conf(INFRA / "spark" / "yarn.conf")
    assert (ROOT / yarn["spark.yarn.dist.files"]).is_file()


def test_dockerfile_copies_what_exists():
    text = (INFRA / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


def test_shell_scripts_are_valid_bash():
    for script in ("submit-standalone.sh", "submit-k8s.sh", "gpu-discovery.sh"):
        subprocess.run(["bash", "-n", str(INFRA / script)], check=True)


@pytest.fixture
def fake_nvidia_smi(tmp_path):
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n3\\n'\n")
    tool.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize(("env", "addresses"), [
    ({}, ["0", "1", "2", "3"]),
    ({"CUDA_VISIBLE_DEVICES": "1,3"}, ["1", "3"]),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5f2c"}, ["0", "1", "2", "3"]),  # UUIDs: nvidia-smi's list as is
])
def test_gpu_discovery_script_prints_spark_resource_json(fake_nvidia_smi, env, addresses):
    out = subprocess.run([str(INFRA / "gpu-discovery.sh")], env={"PATH": f"{fake_nvidia_smi}:/usr/bin:/bin", **env},
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": addresses}


def test_gpu_discovery_without_gpus_offers_none(tmp_path):
    out = subprocess.run([str(INFRA / "gpu-discovery.sh")], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": []}


def test_databricks_bundle_runs_every_stage_in_order_on_one_run_id():
    bundle = yaml.safe_load((INFRA / "databricks" / "databricks.yml").read_text())
    assert bundle["bundle"]["name"] == "cso" and bundle["include"] == ["resources/*.yml"]
    for path in bundle["sync"]["paths"]:
        assert (INFRA / "databricks" / path).is_dir(), path
    jobs = yaml.safe_load((INFRA / "databricks" / "resources" / "cso_daily.job.yml").read_text())["resources"]["jobs"]
    daily = jobs["cso_daily"]
    assert daily["max_concurrent_runs"] == 1 and daily["schedule"]["quartz_cron_expression"]
    clusters = {c["job_cluster_key"]: c for c in daily["job_clusters"]}
    order, previous = [], None
    for task in daily["tasks"]:
        py = task["spark_python_task"]
        assert (INFRA / "databricks" / "resources" / py["python_file"]).resolve() == (
            INFRA / "databricks" / "run_stage.py")
        job, params = py["parameters"][0], py["parameters"][1:]
        assert job in STAGE_JOBS and (ROOT / "jobs" / f"{job}.py").is_file(), job
        assert params[params.index("--run-id") + 1] == "cso-{{job.run_id}}"
        if previous:
            assert task["depends_on"] == [{"task_key": previous}]
        previous = task["task_key"]
        order.append((job, task["job_cluster_key"]))
    assert order[-1] == ("pipeline", "cpu")  # records the run complete for the next incremental run
    assert ("rollouts", "gpu") in order
    assert "spark.task.resource.gpu.amount" in clusters["gpu"]["new_cluster"]["spark_conf"]
    cfg = load_config(INFRA / "databricks" / "cso.yaml")
    assert cfg.select.incremental and cfg.rollouts.gpus_per_task == 1
    reqs = (INFRA / "databricks" / "requirements.txt").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for line in reqs.splitlines():
        if line and not line.startswith("#"):
            assert f'"{line}"' in pyproject, f"{line} is not pyproject.toml's pin"


def test_databricks_entry_names_a_missing_job():
    out = subprocess.run([sys.executable, str(INFRA / "databricks" / "run_stage.py"), "nope"], capture_output=True,
                         text=True)
    assert out.returncode != 0 and "no job 'nope.py'" in out.stderr


def _load_dag_file(monkeypatch):
    """Import infra/airflow/cso_daily.py against a stand-in `airflow` that records DAGs and operators."""
    created: dict[str, dict] = {}

    class DAG:
        current = None

        def __init__(self, dag_id, **kw):
            self.dag_id, self.kw, self.tasks = dag_id, kw, {}
            created[dag_id] = {"dag": self, "tasks": self.tasks}

        def __enter__(self):
            DAG.current = self
            return self

        def __exit__(self, *exc):
            DAG.current = None

    class BashOperator:
        def __init__(self, task_id, bash_command, **kw):
            self.task_id, self.bash_command, self.downstream = task_id, bash_command, []
            DAG.current.tasks[task_id] = self

        def __rshift__(self, other):
            self.downstream.append(other.task_id)
            return other

    airflow = types.ModuleType("airflow")
    airflow.DAG = DAG
    operators = types.ModuleType("airflow.operators")
    bash = types.ModuleType("airflow.operators.bash")
    bash.BashOperator = BashOperator
    for name, mod in [("airflow", airflow), ("airflow.operators", operators), ("airflow.operators.bash", bash)]:
        monkeypatch.setitem(sys.modules, name, mod)
    path = INFRA / "airflow" / "cso_daily.py"
    exec(compile(path.read_text(), str(path), "exec"), {"__name__": "cso_daily"})
    return created


def test_airflow_dag_is_valid_python_and_runs_ingest_then_incremental_mining(monkeypatch):
    ast.parse((INFRA / "airflow" / "cso_daily.py").read_text())
    dags = _load_dag_file(monkeypatch)
    daily = dags["cso_daily"]
    assert daily["dag"].kw["max_active_runs"] == 1 and daily["dag"].kw["catchup"] is False
    ingest, mine = daily["tasks"]["ingest"], daily["tasks"]["mine"]
    assert ingest.downstream == ["mine"]
    assert "CSO_JOB=jobs/ingest.py" in ingest.bash_command and "dt={{ ds }}" in ingest.bash_command
    assert "CSO_JOB=jobs/pipeline.py" in mine.bash_command
    assert "--skip-ingest" in mine.bash_command and "select.incremental=true" in mine.bash_command
    assert "--run-id cso-{{ ds_nodash }}" in ingest.bash_command and "--run-id cso-{{ ds_nodash }}" in mine.bash_command
    assert "CSO_JOB=jobs/housekeeping.py" in dags["cso_housekeeping"]["tasks"]["housekeeping"].bash_command


def test_airflow_commands_render_to_the_submit_scripts(monkeypatch):
    jinja2 = pytest.importorskip("jinja2")  # Airflow renders with Jinja; it comes with Airflow, not with cso
    dags = _load_dag_file(monkeypatch)
    var = {"value": {"cso_repo": str(ROOT), "cso_master": "spark://m:7077", "cso_config": "infra/k8s.yaml",
                     "cso_logs": "s3a://b/logs"}}
    command = jinja2.Template(dags["cso_daily"]["tasks"]["ingest"].bash_command).render(
        var=var, ds="2026-11-23", ds_nodash="20261123")
    assert command == (f"cd {ROOT} && CSO_JOB=jobs/ingest.py infra/submit-standalone.sh spark://m:7077 "
                       "infra/k8s.yaml --run-id cso-20261123 --set \"ingest.paths=['s3a://b/logs/dt=2026-11-23/']\"")
    var["value"]["cso_master"] = "k8s://https://api:6443"
    command = jinja2.Template(dags["cso_daily"]["tasks"]["mine"].bash_command).render(
        var=var, ds="2026-11-23", ds_nodash="20261123")
    assert "CSO_JOB=jobs/pipeline.py infra/submit-k8s.sh https://api:6443 --run-id cso-20261123" in command
