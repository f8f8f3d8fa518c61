"""Incremental runs (the high-water mark in `runs`, read through Delta's change data feed), reruns after a
failure, Delta housekeeping, and two writers MERGing into one table at once."""

import os
import threading
import time
from pathlib import Path

import pytest
from delta.tables import DeltaTable
from pyspark.sql import functions as F

from cso_lib import delta_io
from cso_lib.delta_io import merge, read_table, record_run
from cso_lib.errors import ConfigError
from cso_lib.stages import housekeeping, ingest, pipeline, select
from tests.fakes.log_batches import SIM_SETTINGS, failed, write_batch

pytestmark = pytest.mark.slow


class Boom(RuntimeError):
    """The injected failure."""


def _work_set(spark, cfg, run_id):
    return {r["trajectory_id"] for r in read_table(spark, cfg, "work_set").where(F.col("run_id") == run_id).collect()}


def _stages(spark, cfg, run_id):
    return {r["stage"] for r in read_table(spark, cfg, "runs").where(F.col("run_id") == run_id).collect()}


@pytest.fixture(scope="module")
def scenario(spark, tmp_path_factory):
    """Logs land in three batches; run r1 fails after select, r2 takes A+B, is rerun after C lands, completes;
    r3 follows. Returns the config and what each step saw."""
    from cso_lib.config import load_config

    base = tmp_path_factory.mktemp("incremental")
    logs = base / "logs"
    make = lambda run_id: load_config(None, [  # noqa: E731
        "spark.shuffle_partitions=2", f"storage.warehouse={base / 'wh'}", f"ingest.paths=['{logs}']",
        "select.incremental=true", f"run_id={run_id}", *SIM_SETTINGS])
    out = {"A": write_batch(logs, "a.jsonl", 0, 8)}

    def boom(cfg, spark):
        raise Boom("score_policy failed (injected)")

    stages = dict(pipeline.STAGES)
    pipeline.STAGES["score_policy"] = boom
    try:
        with pytest.raises(Boom):
            pipeline.run(make("r1"), spark)
    finally:
        pipeline.STAGES.clear()
        pipeline.STAGES.update(stages)
    out["r1"] = _work_set(spark, make("r1"), "r1")
    out["r1_stages"] = _stages(spark, make("r1"), "r1")

    out["B"] = write_batch(logs, "b.jsonl", 8, 16)
    ingest.run(make("ingest-b"), spark)
    out["r2"] = select.run(make("r2"), spark)
    out["C"] = write_batch(logs, "c.jsonl", 16, 24)
    ingest.run(make("ingest-c"), spark)
    out["r2_rerun"] = select.run(make("r2"), spark)  # the rerun of r2 keeps its range
    out["r2_rerun_ws"] = _work_set(spark, make("r2"), "r2")
    # r2 completes: what pipeline.run records after its last stage (tested end to end in test_cluster.py)
    record_run(spark, make("r2"), "r2", "pipeline", delta_io.now(), 1.0, {})
    out["r3"] = select.run(make("r3"), spark)
    out["r3_ws"] = _work_set(spark, make("r3"), "r3")
    out["r4"] = select.run(make("r4"), spark)  # r3 never completed: r4 takes C again
    return make, out


def test_a_failed_run_does_not_move_the_mark(spark, scenario):
    make, out = scenario
    assert out["r1"] == failed(out["A"]) and out["r1"]
    assert {"ingest", "select"} <= out["r1_stages"] and "pipeline" not in out["r1_stages"]
    assert "score_policy" not in out["r1_stages"]  # a failed stage records nothing
    # r2 starts where the last *successful* run ended (none): A's trajectories again, plus B's
    assert out["r2"]["since_version"] is None and out["r2"]["selected"] == len(failed(out["A"]) | failed(out["B"]))


def test_a_rerun_keeps_its_work_set(spark, scenario):
    make, out = scenario
    first, rerun = out["r2"], out["r2_rerun"]
    assert (rerun["since_version"], rerun["trajectories_version"]) == (first["since_version"],
                                                                       first["trajectories_version"])
    assert out["r2_rerun_ws"] == failed(out["A"]) | failed(out["B"])  # C landed meanwhile, and is not in it


def test_the_next_run_takes_only_what_arrived_after_the_last_successful_run(spark, scenario):
    make, out = scenario
    assert out["r3"]["since_version"] == out["r2"]["trajectories_version"]
    assert out["r3"]["rows_in"] == len(out["C"])  # read from the change feed: only C's trajectories
    assert out["r3_ws"] == failed(out["C"])
    assert out["r4"]["since_version"] == out["r3"]["since_version"] and out["r4"]["selected"] == len(out["r3_ws"])


def test_housekeeping_compacts_zorders_vacuums_and_sets_properties(spark, scenario):
    make, out = scenario
    cfg = make("hk-1")
    path = cfg.storage.table("work_set")
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.enableChangeDataFeed' = 'false')")
    steps_path = cfg.storage.table("steps")  # a table made before steps collected key statistics only
    spark.sql(f"ALTER TABLE delta.`{steps_path}` UNSET TBLPROPERTIES ('delta.dataSkippingStatsColumns')")
    staging = Path(cfg.storage.staging_path)  # what a killed ingest left, and a running ingest's folder
    for name, age_hours in (("ingest-killed-run", 30), ("ingest-running-now", 0)):
        (staging / name / "s").mkdir(parents=True)
        stamp = time.time() - age_hours * 3600
        os.utime(staging / name, (stamp, stamp))
    # and a file a killed ingest's task wrote into the table's folder but nobody committed
    orphan = Path(steps_path) / "part-00003-0-0123456789ab-c000.snappy.parquet"
    orphan.write_bytes(b"PAR1 never committed")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    before = {n: read_table(spark, cfg, n).count() for n in ("trajectories", "steps", "work_set")}
    cfg.housekeeping.tables = ["trajectories", "steps", "work_set"]
    cfg.housekeeping.retain_hours = 0
    with pytest.raises(ConfigError, match="allow_short_retention"):
        housekeeping.run(cfg, spark)
    cfg.housekeeping.allow_short_retention = True
    result = housekeeping.run(cfg, spark)
    t = result["tables"]
    assert t["work_set"]["properties_set"] == ["delta.enableChangeDataFeed"]
    assert t["steps"]["properties_set"] == ["delta.dataSkippingStatsColumns"]
    assert t["trajectories"]["properties_set"] == []
    assert [Path(p).name for p in result["staging_removed"]] == ["ingest-killed-run"]
    assert sorted(p.name for p in staging.iterdir()) == ["ingest-running-now"]
    assert t["steps"]["files_before"] > t["steps"]["files_after"] == 1  # three ingests' files, compacted
    assert t["steps"]["files_deleted"] > 0 and not orphan.exists()
    history = DeltaTable.forPath(spark, cfg.storage.table("trajectories")).history()
    optimize = history.where(F.col("operation") == "OPTIMIZE").first()
    assert "policy_version" in optimize["operationParameters"]["zOrderBy"]
    assert {n: read_table(spark, cfg, n).count() for n in before} == before  # same rows
    detail = DeltaTable.forPath(spark, path).detail().first()
    assert detail["properties"]["delta.enableChangeDataFeed"] == "true"
    assert "housekeeping" in _stages(spark, cfg, result["run_id"])


def test_housekeeping_rejects_unknown_tables_and_columns(make_cfg):
    with pytest.raises(ConfigError, match="unknown table 'stepz'"):
        housekeeping.check(make_cfg("housekeeping.tables=[stepz]"))
    with pytest.raises(ConfigError, match="no column"):
        housekeeping.check(make_cfg("housekeeping.zorder={steps: [nope]}"))


def test_two_concurrent_writers_merge_without_loss_or_duplicates(spark, make_cfg, monkeypatch):
    """Two threads MERGE overlapping rows into one table at once, several times: Delta rejects the later
    commit of each clash (ConcurrentAppendException) and delta_io.merge retries it, so every key lands once."""
    cfg = make_cfg()
    attempts = []
    conform = delta_io._conform
    monkeypatch.setattr(delta_io, "_conform", lambda df, name: attempts.append(name) or conform(df, name))
    delta_io.ensure_table(spark, cfg, "work_set")
    rounds, barrier, errors = 4, threading.Barrier(2), []

    def writer(offset):
        try:
            for r in range(rounds):
                rows = [(f"run-{r}", f"t{i:03d}", 0) for i in range(offset, offset + 10)]
                df = spark.createDataFrame(rows, "run_id string, trajectory_id string, round int").withColumn(
                    "selected_at", F.current_timestamp())
                barrier.wait(timeout=120)
                merge(spark, cfg, "work_set", df)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(o,)) for o in (0, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ws = read_table(spark, cfg, "work_set")
    assert ws.count() == ws.select("run_id", "trajectory_id").distinct().count() == rounds * 15
    assert len(attempts) > 2 * rounds  # at least one commit conflicted and was retried


def test_without_the_change_feed_new_rows_come_from_the_snapshot_difference(spark, tmp_path):
    """A table written before its change data feed was enabled: arrived() diffs the two snapshots instead."""
    path = str(tmp_path / "t")
    spark.createDataFrame([("a",), ("b",)], "trajectory_id string").write.format("delta").save(path)
    spark.createDataFrame([("c",)], "trajectory_id string").write.format("delta").mode("append").save(path)
    assert [r[0] for r in select.arrived(spark, path, 0, 1).collect()] == ["c"]
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.enableChangeDataFeed' = 'true')")
    spark.createDataFrame([("d",)], "trajectory_id string").write.format("delta").mode("append").save(path)
    assert [r[0] for r in select.arrived(spark, path, 1, 3).collect()] == ["d"]  # from the feed
    assert select.arrived(spark, path, 3, 3).count() == 0 and select.arrived(spark, path, None, 3).count() == 4
