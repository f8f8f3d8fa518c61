"""The ingest commits the Parquet files its Python pass wrote into the tables' folders (cso_lib.delta_commit):
the very files, with correct Delta statistics, in a transaction that conflicts like any Delta write; files
with rows that are not new are rewritten; tables whose layout forbids it are written through Spark."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import orjson
import pytest
from pyspark.sql import functions as F

from cso_lib import delta_commit
from cso_lib.delta_io import ensure_tables, merge
from cso_lib.stages import ingest

pytestmark = pytest.mark.slow

REC = {"task_id": "k", "query": "q?", "outcome": 0, "policy_model": "m", "policy_version": "v"}
PASS_FILE = re.compile(r"part-\d{5}-\d+-[0-9a-f]{12}(-[0-9a-f]{8})?-c000\.snappy\.parquet")


def _write(path: Path, ids, query="q?", tool_every=0) -> None:
    lines = []
    for i in ids:
        steps = []
        for j in range(1 + i % 3):
            action = {"content": f"a{j}"}
            if tool_every and (i + j) % tool_every == 0:
                action["tool_calls"] = [{"id": f"call{i}_{j}", "type": "function",
                                         "function": {"name": f"tool_{j}", "arguments": "{}"}}]
            steps.append({"action": action, "observation": f"o{j}"})
        lines.append(orjson.dumps({**REC, "query": query, "trajectory_id": f"c{i:04d}", "steps": steps,
                                   "reward": i / 1000}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")


def _table(spark, cfg, name):
    return spark.read.format("delta").load(cfg.storage.table(name))


def _adds(cfg, name) -> list[dict]:
    """Every `add` action in the table's log, in commit order."""
    adds = []
    for f in sorted((Path(cfg.storage.table(name)) / "_delta_log").glob("*.json")):
        adds += [a["add"] for a in map(json.loads, f.read_text().splitlines()) if "add" in a]
    return adds


def _stray(cfg, name) -> set[str]:
    """Parquet files in the table's folder that no version of its log adds."""
    folder = Path(cfg.storage.table(name))
    return {p.name for p in folder.glob("*.parquet")} - {a["path"] for a in _adds(cfg, name)}


def _writes(spark, cfg, name) -> list:
    return spark.sql(f"DESCRIBE HISTORY delta.`{cfg.storage.table(name)}`").where("operation = 'WRITE'").collect()


def _once(df, *keys) -> bool:
    return df.count() == df.select(*keys).distinct().count()


def test_first_ingest_commits_the_files_it_wrote_with_true_statistics(spark, make_cfg, tmp_path):
    logs = tmp_path / "logs"
    _write(logs / "a.jsonl", range(300), tool_every=2)
    cfg = make_cfg(f"ingest.paths=[{logs}]", "ingest.split_bytes=8000")  # several tasks, several files
    stats = ingest.run(cfg, spark)
    assert stats["new"] == 300 and stats["steps_new"] == sum(1 + i % 3 for i in range(300))

    for name, keys, rows in (("trajectories", ["trajectory_id"], 300),
                             ("steps", ["trajectory_id", "step_idx"], stats["steps_new"])):
        df = _table(spark, cfg, name)
        assert df.count() == rows and _once(df, *keys)
        adds = _adds(cfg, name)
        assert len(adds) > 1 and all(PASS_FILE.fullmatch(a["path"]) for a in adds)  # the pass's own files
        assert not _stray(cfg, name)
        history = spark.sql(f"DESCRIBE HISTORY delta.`{cfg.storage.table(name)}`").orderBy("version").collect()[-1]
        assert history["operation"] == "WRITE" and not history["isBlindAppend"]
        assert int(history["operationMetrics"]["numOutputRows"]) == rows
        # Each file's statistics are its rows' own: count, nulls, min and max per statistics column.
        columns = json.loads(adds[0]["stats"])["nullCount"]
        assert "trajectory_id" in columns
        actual = {
            r["f"]: r.asDict()
            for r in df.groupBy(F.regexp_extract("_metadata.file_path", r"[^/]+$", 0).alias("f")).agg(
                F.count("*").alias("rows"),
                *[F.count_if(F.col(c).isNull()).alias(f"null {c}") for c in columns],
                *[F.min(c).alias(f"min {c}") for c in columns],
                *[F.max(c).alias(f"max {c}") for c in columns],
            ).collect()
        }
        for add in adds:
            st, got = json.loads(add["stats"]), actual[add["path"]]
            assert st["numRecords"] == got["rows"]
            for col, nulls in st["nullCount"].items():
                assert got[f"null {col}"] == nulls, (name, col)
            for col, low in st["minValues"].items():
                assert (low, st["maxValues"][col]) == (got[f"min {col}"], got[f"max {col}"]), (name, col)

    # Delta's data skipping reads those statistics (a file whose bounds were wrong would be skipped).
    steps = _table(spark, cfg, "steps")
    assert steps.where("trajectory_id = 'c0123'").count() == 1 + 123 % 3
    assert steps.where("action_tool = 'tool_1'").count() == \
        steps.where(F.col("action").contains("tool_1")).count() > 0
    point = spark.sql(f"SELECT * FROM delta.`{cfg.storage.table('trajectories')}` WHERE trajectory_id = 'c0007'")
    assert point.first()["reward"] == 7 / 1000


def test_mixed_batch_rewrites_only_the_files_with_old_rows(spark, make_cfg, tmp_path):
    logs = tmp_path / "logs"
    _write(logs / "a.jsonl", range(40))
    cfg = make_cfg(f"ingest.paths=[{logs}]")
    ingest.run(cfg, spark)
    before = {a["path"] for a in _adds(cfg, "trajectories")}
    # Day two: a.jsonl again (all present), b.jsonl with new ids and a duplicate of one of them, and 0.jsonl
    # (read first) with a changed copy of an ingested id: a conflict, which makes a.jsonl's copy a duplicate.
    _write(logs / "b.jsonl", [*range(40, 60), 45])
    (logs / "0.jsonl").write_bytes(orjson.dumps({**REC, "query": "changed", "trajectory_id": "c0003",
                                                 "steps": [{"action": {"content": "x"}, "observation": "y"}]}))
    stats = ingest.run(cfg, spark)
    assert (stats["new"], stats["already_present"], stats["duplicates"], stats["conflicts"]) == (20, 39, 2, 1)
    t, s = _table(spark, cfg, "trajectories"), _table(spark, cfg, "steps")
    assert t.count() == 60 and _once(t, "trajectory_id")
    assert s.count() == sum(1 + i % 3 for i in range(60)) and _once(s, "trajectory_id", "step_idx")
    assert t.where("trajectory_id = 'c0003'").first()["query"] == "q?"  # the table keeps what it had
    new_adds = [a for a in _adds(cfg, "trajectories") if a["path"] not in before]
    assert len(new_adds) == 1 and PASS_FILE.fullmatch(new_adds[0]["path"])  # b's file, rewritten by pyarrow
    assert json.loads(new_adds[0]["stats"])["numRecords"] == 20
    assert not _stray(cfg, "trajectories") and not _stray(cfg, "steps")
    assert ingest.run(cfg, spark)["new"] == 0  # and again: nothing


def test_steps_left_by_a_run_killed_between_the_commits_are_not_added_twice(spark, make_cfg, tmp_path):
    logs = tmp_path / "logs"
    _write(logs / "a.jsonl", range(10))
    cfg = make_cfg(f"ingest.paths=[{logs}]")
    ensure_tables(spark, cfg)
    # A killed run committed the steps of c0000..c0004 (with their ingest run id) but not their trajectories.
    steps = [(f"c{i:04d}", j, "{}", "[]", None, "killed") for i in range(5) for j in range(1 + i % 3)]
    merge(spark, cfg, "steps", spark.createDataFrame(
        steps, "trajectory_id string, step_idx int, action string, observations string, action_tool string, "
        "ingest_run_id string"))
    stats = ingest.run(cfg, spark)
    assert stats["new"] == 10 and stats["steps_new"] == sum(1 + i % 3 for i in range(5, 10))
    s = _table(spark, cfg, "steps")
    assert s.count() == sum(1 + i % 3 for i in range(10)) and _once(s, "trajectory_id", "step_idx")
    assert s.where("ingest_run_id = 'killed'").count() == len(steps)
    assert not _stray(cfg, "steps")


def test_a_commit_that_lands_first_makes_the_direct_commit_fall_back(spark, make_cfg, tmp_path, monkeypatch):
    """Between the ingest's snapshot and its commit, another writer commits some of the same steps: the direct
    commit conflicts (its transaction read the whole table), and the rows are appended by insert_new against
    the new table instead; its unused files are deleted."""
    logs = tmp_path / "logs"
    _write(logs / "a.jsonl", range(30))
    cfg = make_cfg(f"ingest.paths=[{logs}]")
    ensure_tables(spark, cfg)
    real = delta_commit.DirectAppend.commit
    raced = []

    def commit(self, files, read_whole_table=True):
        if self.path.endswith("/steps") and not raced:
            raced.append(True)
            rows = [(f"c{i:04d}", 0, "{}", "[]", None, "other") for i in range(10)]
            merge(spark, cfg, "steps", spark.createDataFrame(
                rows, "trajectory_id string, step_idx int, action string, observations string, "
                "action_tool string, ingest_run_id string"))
        return real(self, files, read_whole_table)

    monkeypatch.setattr(delta_commit.DirectAppend, "commit", commit)
    stats = ingest.run(cfg, spark)
    assert raced and stats["new"] == 30
    s = _table(spark, cfg, "steps")
    assert s.count() == sum(1 + i % 3 for i in range(30)) and _once(s, "trajectory_id", "step_idx")
    assert s.where("ingest_run_id = 'other'").count() == 10  # the rows that landed first stay
    ops = [r["operation"] for r in spark.sql(f"DESCRIBE HISTORY delta.`{cfg.storage.table('steps')}`").collect()]
    assert ops.count("WRITE") == 1 and "MERGE" in ops  # the fallback's append, after the concurrent MERGE
    assert not any(PASS_FILE.fullmatch(a["path"]) for a in _adds(cfg, "steps"))  # Spark wrote the rows
    assert not _stray(cfg, "steps")
    # trajectories had no competitor: its files were committed as written
    assert all(PASS_FILE.fullmatch(a["path"]) for a in _adds(cfg, "trajectories"))


def test_a_table_with_a_check_constraint_is_written_through_spark(spark, make_cfg, tmp_path, caplog):
    logs = tmp_path / "logs"
    _write(logs / "a.jsonl", range(12))
    cfg = make_cfg(f"ingest.paths=[{logs}]")
    ensure_tables(spark, cfg)
    spark.sql(f"ALTER TABLE delta.`{cfg.storage.table('steps')}` ADD CONSTRAINT idx CHECK (step_idx < 2)")
    with caplog.at_level(logging.WARNING, logger="cso"):
        with pytest.raises(Exception, match="(?i)check constraint"):  # Delta enforces it: c0002 has 3 steps
            ingest.run(cfg, spark)
    assert "steps: the table has CHECK constraints" in caplog.text
    assert _table(spark, cfg, "steps").count() == 0
    assert not [f for f in _stray(cfg, "steps") if PASS_FILE.fullmatch(f)]  # (Spark's aborted write left its own)

    spark.sql(f"ALTER TABLE delta.`{cfg.storage.table('steps')}` DROP CONSTRAINT idx")
    spark.sql(f"ALTER TABLE delta.`{cfg.storage.table('steps')}` ADD CONSTRAINT idx CHECK (step_idx < 3)")
    assert ingest.run(cfg, spark)["new"] == 12
    assert _table(spark, cfg, "steps").count() == sum(1 + i % 3 for i in range(12))
    assert not any(PASS_FILE.fullmatch(a["path"]) for a in _adds(cfg, "steps"))  # Spark's own files
    assert not any(PASS_FILE.fullmatch(a["path"]) for a in _adds(cfg, "trajectories"))  # both tables


def test_a_delta_without_the_transaction_api_is_written_through_spark(spark, make_cfg, tmp_path, monkeypatch,
                                                                      caplog):
    """A Delta other than the pinned one (a vendor's runtime) may lack the classes DirectAppend drives: the
    ingest and the runs records then go through Spark's writer, with a warning naming why."""
    logs = tmp_path / "logs"
    _write(logs / "a.jsonl", range(15))
    cfg = make_cfg(f"ingest.paths=[{logs}]")
    monkeypatch.setattr(delta_commit, "_API", {})
    monkeypatch.setattr(delta_commit, "_api_problem", lambda spark: "no OptimisticTransaction here")
    with caplog.at_level(logging.WARNING, logger="cso"):
        stats = ingest.run(cfg, spark)
    assert "transaction API differs (no OptimisticTransaction here)" in caplog.text
    assert stats["new"] == 15 and _table(spark, cfg, "trajectories").count() == 15
    assert _once(_table(spark, cfg, "steps"), "trajectory_id", "step_idx")
    for name in ("trajectories", "steps"):
        assert not any(PASS_FILE.fullmatch(a["path"]) for a in _adds(cfg, name)), name
    assert all("partitionBy" in h["operationParameters"] for h in _writes(spark, cfg, "runs"))  # Spark's writer
    assert ingest.run(cfg, spark)["new"] == 0


def test_runs_records_are_direct_blind_appends(spark, make_cfg, tmp_path):
    logs = tmp_path / "logs"
    _write(logs / "a.jsonl", range(3))
    cfg = make_cfg(f"ingest.paths=[{logs}]")
    ingest.run(cfg, spark)
    ingest.run(cfg, spark)
    runs = _table(spark, cfg, "runs").where("stage = 'ingest'").orderBy("started_at").collect()
    assert [json.loads(r["details"])["new"] for r in runs] == [3, 0]
    assert all(r["finished_at"] >= r["started_at"] and r["seconds"] > 0 for r in runs)
    history = _writes(spark, cfg, "runs")
    assert len(history) == 2 and all(h["isBlindAppend"] for h in history)
    assert not any("partitionBy" in h["operationParameters"] for h in history)  # not Spark's writer: ours
    assert all(int(h["operationMetrics"]["numOutputRows"]) == 1 for h in history)
