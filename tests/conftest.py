"""Shared fixtures. One small local Spark session with Delta for the whole test session."""

from __future__ import annotations

import copy
import os
import shutil
import sys

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
