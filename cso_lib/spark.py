"""SparkSession construction. Only entry points (jobs/, the CLI) and the test fixture call this."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from cso_lib.config import Config

DELTA_PACKAGE = "io.delta:delta-spark_2.13:4.0.1"
CHECKOUT = Path(__file__).resolve().parent.parent


def delta_jars(jars_dir: str | None) -> list[str]:
    """Delta jars fetched at setup (scripts/setup.sh), or [] when they are not there."""
    folder = Path(jars_dir) if jars_dir else CHECKOUT / ".cache" / "jars"
    return sorted(str(p) for p in folder.glob("*.jar")) if folder.is_dir() else []


def base_conf(cfg: Config) -> dict[str, str]:
    """Settings every cso session gets: Delta, quiet console, small shuffles for local runs."""
    conf = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        "spark.databricks.delta.snapshotPartitions": str(cfg.spark.shuffle_partitions),
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # Secrets never reach the event log or the UI's environment page.
        "spark.redaction.regex": "(?i)secret|password|token|api[_.-]?key|authorization",
    }
    jars = delta_jars(cfg.spark.delta_jars_dir)
    if jars:
        conf["spark.jars"] = ",".join(jars)
    else:
        conf["spark.jars.packages"] = DELTA_PACKAGE
        conf["spark.jars.ivy"] = str(CHECKOUT / ".cache" / "ivy")
    if cfg.spark.master and cfg.spark.master.startswith("local"):
        # Executors of a local session use this interpreter (the venv), not whatever `python3` is on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        conf["spark.driver.host"] = "127.0.0.1"
        # Delta's VACUUM lists the table in this many tasks (default 10000, sized for clusters): on local[2]
        # that is ~10000 empty tasks per VACUUM, minutes for a small table instead of seconds.
        conf["spark.sql.sources.parallelPartitionDiscovery.parallelism"] = str(cfg.spark.shuffle_partitions)
    conf.update(cfg.spark.conf)
    return conf


def build_spark(cfg: Config, app_suffix: str = "") -> SparkSession:
    builder = SparkSession.builder.appName(f"{cfg.spark.app_name}{'-' + app_suffix if app_suffix else ''}")
    if cfg.spark.master:
        builder = builder.master(cfg.spark.master)
    for key, value in base_conf(cfg).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
