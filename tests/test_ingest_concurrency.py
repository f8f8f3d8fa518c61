"""Concurrent writers of the ingest tables: insert_new (the append behind every ingest, the first one included)
must conflict with a commit that lands while it runs, and retry, never duplicating rows.

The race is made deterministic: the appended rows pass through a Python UDF that, once the append's
transaction has started, signals and waits until the test has committed the same rows from another writer.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from cso_lib.delta_io import ensure_table, insert_new, merge

pytestmark = pytest.mark.slow

ROWS = [(f"t{i}", j, "{}", "[]", None, "r") for i in range(20) for j in range(3)]
SCHEMA = "trajectory_id string, step_idx int, action string, observations string, action_tool string, ingest_run_id string"


def _gated(spark, flags: Path):
    """The ROWS, through a UDF that creates flags/started and waits (at most 120 s) for flags/go."""
    started, go = str(flags / "started"), str(flags / "go")

    @F.udf("string")
    def gate(value):
        import os
        import time as t

        open(started, "a").close()
        deadline = t.monotonic() + 120
        while not os.path.exists(go) and t.monotonic() < deadline:
            t.sleep(0.05)
        return value

    return spark.createDataFrame(ROWS, SCHEMA).repartition(1).withColumn("action", gate("action"))


def _race(spark, cfg, tmp_path: Path, write) -> None:
    """Run write(gated rows) in a thread; commit ROWS with a MERGE while it is inside its transaction."""
    flags = tmp_path / "flags"
    flags.mkdir()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            write(_gated(spark, flags))
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 120
    while not (flags / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (flags / "started").exists(), "the gated write never started"
    merge(spark, cfg, "steps", spark.createDataFrame(ROWS, SCHEMA))  # the concurrent writer commits first
    (flags / "go").touch()
    thread.join(300)
    assert not thread.is_alive() and not errors, errors


def _steps(spark, cfg):
    return spark.read.format("delta").load(cfg.storage.table("steps"))


def test_insert_new_retries_against_a_concurrent_commit(spark, make_cfg, tmp_path):
    cfg = make_cfg()
    path = ensure_table(spark, cfg, "steps")
    _race(spark, cfg, tmp_path, lambda df: insert_new(spark, cfg, "steps", df))

    steps = _steps(spark, cfg)
    assert steps.count() == len(ROWS)
    assert steps.groupBy("trajectory_id", "step_idx").count().filter("count > 1").isEmpty()
    history = spark.sql(f"DESCRIBE HISTORY delta.`{path}`").orderBy("version").collect()
    writes = [h for h in history if h["operation"] == "WRITE"]
    assert all(not h["isBlindAppend"] for h in writes)  # the append read the table: it can conflict


def test_a_blind_append_in_the_same_race_duplicates_rows(spark, make_cfg, tmp_path):
    """The control: the race above is real. A plain (blind) append commits over the concurrent rows."""
    cfg = make_cfg()
    path = ensure_table(spark, cfg, "steps")
    _race(spark, cfg, tmp_path, lambda df: df.write.format("delta").mode("append").save(path))
    assert _steps(spark, cfg).count() == 2 * len(ROWS)


def test_two_first_ingests_of_the_same_file_at_once(spark, make_cfg, tmp_path):
    """Two ingest runs of one file into the same empty warehouse, concurrently: each row exactly once."""
    import orjson

    from cso_lib.delta_io import ensure_tables
    from cso_lib.stages import ingest

    logs = tmp_path / "logs.jsonl"
    rec = {"task_id": "k", "query": "q?", "outcome": 0, "policy_model": "m", "policy_version": "v"}
    step = {"action": {"content": "a"}, "observation": "o"}
    logs.write_bytes(
        b"\n".join(
            orjson.dumps({**rec, "trajectory_id": f"c{i}", "steps": [step] * (1 + i % 3)}) for i in range(200)
        )
    )
    cfg = make_cfg(f"ingest.paths=[{logs}]")
    ensure_tables(spark, cfg)
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(ingest.run(cfg.model_copy(deep=True), spark)))]
    threads.append(
        threading.Thread(target=lambda: results.append(ingest.run(cfg.model_copy(deep=True), spark)))
    )
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert len(results) == 2
    t = spark.read.format("delta").load(cfg.storage.table("trajectories"))
    steps = _steps(spark, cfg)
    assert (t.count(), t.select("trajectory_id").distinct().count()) == (200, 200)
    assert (
        steps.count()
        == steps.select("trajectory_id", "step_idx").distinct().count()
        == sum(1 + i % 3 for i in range(200))
    )
    assert sorted(r["read"] for r in results) == [200, 200]
