"""Shared fixtures. One small local Spark session with Delta for the whole test session."""

from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Every JVM the suite starts (the workers' Spark drivers, spark-submit drivers and executors, the standalone
# master and workers, the `cso` processes of the kill tests, the notebook's kernel) inherits these through
# JAVA_TOOL_OPTIONS. Most of them live a minute or two, and a cold Spark JVM spends almost half its CPU in the
# JIT compilers: a 40-task pipeline plus a rerun in a fresh JVM took 208 CPU-s with the defaults, 176 with the
# serial collector, 140 with C2 compiling only methods ten times hotter than by default, at the same wall time
# (2 cores, quiet). On two loaded cores CPU is the suite's bottleneck. Behaviour is unchanged. Unset with
# CSO_TEST_JVM_DEFAULTS=0, or replace by setting JAVA_TOOL_OPTIONS yourself.
TEST_JVM_OPTIONS = ("-XX:+UseSerialGC -XX:Tier4InvocationThreshold=50000 -XX:Tier4MinInvocationThreshold=20000 "
                    "-XX:Tier4CompileThreshold=60000 -XX:Tier4BackEdgeThreshold=400000")
if os.environ.get("CSO_TEST_JVM_DEFAULTS", "1") != "0":
    os.environ.setdefault("JAVA_TOOL_OPTIONS", TEST_JVM_OPTIONS)


# The suite runs on two pytest-xdist workers (pyproject: `-n 2 --dist loadfile`): a Spark test keeps its driver
# thread busy and leaves the other core mostly idle, so two test processes finish sooner than one. Scheduling
# (`ModuleScheduling` below) sends whole modules to a worker, so module-scoped fixtures run once; the modules
# that share the session's simulated pipeline run (below) go together, so it runs once per suite; and the
# longest modules start first (measured seconds; others count a second a test), so no long one runs alone at
# the end.
SIM_PIPELINE_MODULES = {"test_pipeline", "test_train_dpo", "test_taxonomy", "test_baselines"}
MODULE_SECONDS = {
    "tests/test_cluster.py": 240, "sim_pipeline": 260, "tests/test_batch_mode.py": 250, "tests/test_ledger.py": 250,
    "tests/test_vllm_backend.py": 160, "tests/test_real_server.py": 100, "tests/test_iterate.py": 80,
    "tests/test_incremental.py": 80, "tests/test_ingest_commit.py": 70, "tests/test_ingest_spark.py": 40,
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own choice from --dist
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "sim_pipeline" if Path(path).stem in SIM_PIPELINE_MODULES else path

        def _assign_work_unit(self, node) -> None:
            longest = max(self.workqueue, key=lambda s: MODULE_SECONDS.get(s, len(self.workqueue[s])))
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from cso_lib.config import load_config
    from cso_lib.spark import build_spark

    base = tmp_path_factory.mktemp("spark")
    cfg = load_config(
        None,
        [
            "spark.master=local[2]",
            "spark.shuffle_partitions=2",
            "spark.app_name=cso-tests",
            f"spark.conf={{spark.sql.warehouse.dir: '{base / 'spark-warehouse'}', spark.ui.enabled: 'false', "
            f"spark.driver.memory: 2g, spark.sql.adaptive.coalescePartitions.enabled: 'true'}}",
        ],
    )
    session = build_spark(cfg)
    yield session
    session.stop()


@pytest.fixture
def make_cfg(tmp_path):
    """Config for one test: its own warehouse; extra dotted overrides as arguments."""
    from cso_lib.config import load_config

    def make(*overrides: str):
        return load_config(
            None,
            [
                "spark.shuffle_partitions=2",
                f"storage.warehouse={tmp_path / 'warehouse'}",
                f"sim.logs_dir={tmp_path / 'sim_logs'}",
                *overrides,
            ],
        )

    return make


def assert_df_equal(actual, expected, **kw):
    """The one DataFrame comparison the tests use (pyspark's own, order-insensitive)."""
    from pyspark.testing import assertDataFrameEqual

    assertDataFrameEqual(actual, expected, **kw)


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The tiny local chat model (cso_lib.tiny_model), built once into .cache/models and reused."""
    from cso_lib.tiny_model import default_tiny_model_dir, ensure_tiny_model

    return ensure_tiny_model(default_tiny_model_dir())


# One simulated pipeline run (with the export stage and the sim's calls recorded) that several modules read:
# test_pipeline, test_train_dpo, test_taxonomy and test_baselines. It runs once per session; each module gets
# its own copy of the warehouse and logs (sim_pipeline), so what one module writes never reaches another.
SIM_PIPELINE = ["sim.n_tasks=40", "sim.n_entities=80", "sim.policy_error_rate=0.3", "sim.record_calls=true"]


@pytest.fixture(scope="session")
def _sim_pipeline_once(spark, tmp_path_factory):
    from cso_lib.config import load_config
    from cso_lib.stages import pipeline

    base = tmp_path_factory.mktemp("sim_pipeline")
    cfg = load_config(None, ["spark.shuffle_partitions=2", f"storage.warehouse={base / 'wh'}",
                             f"sim.logs_dir={base / 'logs'}", *SIM_PIPELINE])
    result = pipeline.run(cfg, spark, exports=True)
    return base, cfg, result


@pytest.fixture(scope="module")
def sim_pipeline(_sim_pipeline_once, tmp_path_factory):
    """(cfg, result, base): the shared pipeline run, as a private copy in base (base/wh, base/logs)."""
    src, cfg, result = _sim_pipeline_once
    base = tmp_path_factory.mktemp("sim_pipeline_copy")
    for name in ("wh", "logs"):
        shutil.copytree(src / name, base / name)
    own = cfg.model_copy(deep=True)
    own.storage.warehouse = str(base / "wh")
    own.sim.logs_dir = str(base / "logs")
    return own, copy.deepcopy(result), base

