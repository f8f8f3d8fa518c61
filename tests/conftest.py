"""Shared fixtures. One small local Spark session with Delta for the whole test session."""

from __future__ import annotations

import os
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
