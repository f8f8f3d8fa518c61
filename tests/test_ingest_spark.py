"""The ingest stage on Spark + Delta: every input format, quarantine, reconciliation, idempotence.

The tests of this module share one warehouse and run in order: the first ingests every file format at once
(in 4 KiB splits, so records are found across split boundaries), the next ones re-ingest, conflict, and
read a Delta table of raw logs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from cso_lib.errors import InputError
from cso_lib.messages import call
from cso_lib.stages import ingest

pytestmark = pytest.mark.slow

TAU_BENCH = "/work/shared/data/tau-bench-airline/gpt-4o-airline.json"
MAX_RECORD_BYTES = 100_000


def native(i: int, **overrides: Any) -> dict[str, Any]:
    rec = {
        "trajectory_id": f"native-{i}",
        "task_id": f"task-{i}",
        "query": f"What is {i} squared?",
        "outcome": i % 2,
        "policy_model": "policy",
        "policy_version": "v1",
        "system_prompt": "You are a calculator.",
        "steps": [
            {
                "action": {"content": "Compute.", "tool_calls": [call("c0", "calculator", {"x": i})]},
                "observation": str(i * i),
            },
            {"action": {"content": None, "tool_calls": [call("c1", "final_answer", {"answer": str(i * i)})]}},
        ],
    }
    return rec | overrides


def chat(i: int, **overrides: Any) -> dict[str, Any]:
    rec = {k: v for k, v in native(i).items() if k not in ("steps", "system_prompt")}
    rec["trajectory_id"] = f"chat-{i}"
    rec["messages"] = [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": rec["query"]},
        {"role": "assistant", "content": None, "tool_calls": [call("c0", "calculator", {"x": i})]},
        {"role": "tool", "tool_call_id": "c0", "content": str(i * i)},
        {"role": "assistant", "content": str(i * i)},
    ]
    return rec | overrides


def _step(action: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"action": action, "observation": None}]


def _bad_arguments() -> dict[str, Any]:
    return native(
        90, steps=_step({"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{'a': 1}"}}]})
    )


def _orphan_tool() -> dict[str, Any]:
    rec = chat(91)
    rec["messages"][3]["tool_call_id"] = "c9"
    return rec


def _drop(rec: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k != key}


# (raw line, expected reason) per malformed record of the mixed file: 20 distinct kinds.
BAD = [
    (b'{"trajectory_id": "x", ', "invalid JSON: "),
    (b"42", "record must be a JSON object, got int"),
    (b'"just a string"', "record must be a JSON object, got str"),
    (_drop(native(70), "trajectory_id"), "trajectory_id is missing"),
    (native(71, trajectory_id=""), "trajectory_id must be a non-empty string"),
    (_drop(native(72), "task_id"), "task_id is missing"),
    (_drop(native(73), "query"), "query is missing"),
    (_drop(native(74), "policy_version"), "policy_version is missing"),
    (_drop(native(75), "outcome"), "outcome is missing and there is no reward to derive it from"),
    (native(76, outcome=3), "outcome must be 0 or 1, got 3"),
    (native(77, reward=-0.5), "reward must be a number in [0, 1], got -0.5"),
    (_drop(native(78), "steps"), "record has neither steps nor messages"),
    (native(79, messages=chat(79)["messages"]), "record has both steps and messages"),
    (native(80, steps=[]), "steps must be a non-empty list"),
    (native(81, steps=[{"observation": "x"}]), "steps[0].action is missing"),
    (native(82, steps=_step({"content": None})), "steps[0].action has neither content nor tool_calls"),
    (
        native(83, steps=_step({"tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]})),
        "steps[0].action.tool_calls[0].function.name is missing",
    ),
    (_bad_arguments(), "steps[0].action.tool_calls[0].function.arguments is not valid JSON: "),
    (chat(92, messages=[{"role": "robot", "content": "beep"}]), "messages[0].role must be one of"),
    (_orphan_tool(), "messages[3].tool_call_id 'c9' matches no earlier tool call"),
    (chat(93, messages=[{"role": "user", "content": "hi"}]), "messages has no assistant message"),
    (native(94, query="q" * (MAX_RECORD_BYTES + 10)), f"over ingest.max_record_bytes={MAX_RECORD_BYTES}"),
    (
        native(1, query="A different query"),
        "duplicate trajectory_id 'native-1' in this batch; first occurrence at ",
    ),
]
GOOD_NATIVE, GOOD_CHAT = 30, 20


def _write_jsonl(path: Path, lines: list[bytes]) -> dict[bytes, tuple[int, int]]:
    """Write lines; (line number, byte offset) of each."""
    where, offset = {}, 0
    with path.open("wb") as f:
        for n, line in enumerate(lines, start=1):
            where[line] = (n, offset)
            f.write(line + b"\n")
            offset += len(line) + 1
    return where


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ingest")
    logs = root / "logs"
    logs.mkdir()
    _write_jsonl(logs / "native.jsonl", [orjson.dumps(native(i)) for i in range(GOOD_NATIVE)])
    _write_jsonl(logs / "chat.jsonl", [b"", *(orjson.dumps(chat(i)) for i in range(GOOD_CHAT)), b"  "])
    bad = [raw if isinstance(raw, bytes) else orjson.dumps(raw) for raw, _ in BAD]
    mixed = [orjson.dumps(native(100)), b"", *bad, orjson.dumps(native(101)), b"\t"]
    where = _write_jsonl(root / "mixed.jsonl", mixed)
    (logs / "notes.txt").write_text("not a log file, ignored")
    return {"root": root, "logs": logs, "mixed": root / "mixed.jsonl", "where": where, "bad": bad}


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warehouse")


@pytest.fixture
def cfg_with(make_cfg, warehouse):
    def make(*overrides: str):
        return make_cfg(
            f"storage.warehouse={warehouse}",
            f"ingest.max_record_bytes={MAX_RECORD_BYTES}",
            "ingest.split_bytes=4096",
            *overrides,
        )

    return make


def _paths(inputs: dict[str, Any]) -> str:
    return f"ingest.paths=[{inputs['logs']}, {TAU_BENCH}, {inputs['mixed']}]"


def _count(spark, warehouse: Path, table: str) -> int:
    return spark.sql(f"SELECT count(*) AS n FROM delta.`{warehouse}/{table}`").first()["n"]


def test_every_format_and_every_kind_of_bad_record(spark, cfg_with, inputs, warehouse):
    stats = ingest.run(cfg_with(_paths(inputs)), spark)

    good = GOOD_NATIVE + GOOD_CHAT + 200 + 2
    assert stats["read"] == good + len(BAD)
    assert (stats["accepted"], stats["quarantined"], stats["new"], stats["already_present"]) == (
        good,
        len(BAD),
        good,
        0,
    )
    assert stats["read"] == stats["accepted"] + stats["quarantined"]
    assert not (warehouse / "_staging" / stats["run_id"]).exists()
    assert (stats["rows_in"], stats["rows_out"], stats["steps_new"]) == (
        stats["read"],
        good,
        2 * (good - 200) + 2454,
    )

    t = spark.read.format("delta").load(f"{warehouse}/trajectories")
    by_format = {r["input_format"]: r["count"] for r in t.groupBy("input_format").count().collect()}
    assert by_format == {"native": GOOD_NATIVE + 2, "messages": GOOD_CHAT, "tau-bench": 200}
    tau = t.filter("env = 'tau-bench-airline'")
    assert (tau.count(), tau.filter("outcome = 0").count()) == (200, 116)
    assert _count(spark, warehouse, "steps") == stats["steps_new"]

    q = {r["locator"]: r for r in spark.read.format("delta").load(f"{warehouse}/quarantine").collect()}
    assert len(q) == len(BAD)
    for raw, (_, reason) in zip(inputs["bad"], BAD, strict=True):
        line, offset = inputs["where"][raw]
        row = q.get(f"line {line}") or q[f"byte {offset}"]
        assert reason in row["reason"], (row["reason"], reason)
        assert row["source"] == str(inputs["mixed"]) and row["run_id"] == stats["run_id"]
        assert row["raw"] == (None if reason.startswith("duplicate") else raw[:4096].decode())
    dup = next(r for r in q.values() if r["reason"].startswith("duplicate"))
    assert dup["reason"].endswith(f"first occurrence at {inputs['logs'] / 'native.jsonl'} line 2")


def test_reingesting_the_same_files_adds_nothing(spark, cfg_with, inputs, warehouse):
    before = {name: _count(spark, warehouse, name) for name in ("trajectories", "steps", "quarantine")}
    stats = ingest.run(cfg_with(_paths(inputs)), spark)
    assert (stats["new"], stats["rows_out"], stats["quarantined"]) == (0, 0, len(BAD))
    assert stats["already_present"] == stats["accepted"] == before["trajectories"]
    assert {name: _count(spark, warehouse, name) for name in before} == before
    runs = spark.sql(
        f"SELECT rows_in, rows_out FROM delta.`{warehouse}/runs` WHERE stage = 'ingest'"
    ).collect()
    assert sorted(r["rows_out"] for r in runs) == [0, before["trajectories"]]


def test_tau_bench_steps_join_back_to_the_assistant_messages(spark, warehouse):
    record = json.loads(Path(TAU_BENCH).read_text())[0]
    tid = f"tau-bench-airline/{record['task_id']}/{record['trial']}"
    t = spark.sql(f"SELECT * FROM delta.`{warehouse}/trajectories` WHERE trajectory_id = '{tid}'").first()
    steps = spark.sql(
        f"SELECT action, observations FROM delta.`{warehouse}/steps` WHERE trajectory_id = '{tid}' ORDER BY step_idx"
    ).collect()
    assistant = [m for m in record["traj"] if m["role"] == "assistant"]
    assert (t["n_steps"], len(steps)) == (len(assistant), len(assistant))
    assert [json.loads(s["action"]) for s in steps] == assistant
    preamble = json.loads(t["preamble"])
    assert preamble == record["traj"][:2] and preamble[0]["role"] == "system"
    rebuilt = preamble + [m for s in steps for m in [json.loads(s["action"]), *json.loads(s["observations"])]]
    assert rebuilt == record["traj"]
    assert (t["locator"], t["source"], t["query"]) == ("[0]", TAU_BENCH, record["traj"][1]["content"])


def test_changed_record_with_an_ingested_id_is_quarantined(spark, cfg_with, inputs, warehouse, tmp_path):
    changed = tmp_path / "changed.jsonl"
    _write_jsonl(
        changed, [orjson.dumps(native(5, outcome=0)), orjson.dumps(native(6)), orjson.dumps(native(500))]
    )
    stats = ingest.run(cfg_with(f"ingest.paths=[{changed}]"), spark)
    assert (stats["read"], stats["new"], stats["already_present"], stats["conflicts"]) == (3, 1, 1, 1)
    row = spark.sql(f"SELECT * FROM delta.`{warehouse}/quarantine` WHERE source = '{changed}'").first()
    assert row["locator"] == "line 1" and row["record_id"] == "native-5"
    assert row["reason"].startswith("trajectory_id 'native-5' already ingested with different content")
    kept = spark.sql(f"SELECT outcome FROM delta.`{warehouse}/trajectories` WHERE trajectory_id = 'native-5'")
    assert kept.first()["outcome"] == 1


def test_delta_table_of_raw_logs(spark, cfg_with, warehouse, tmp_path):
    rows = [
        ("log-a", orjson.dumps(chat(300)).decode()),
        ("log-b", "{broken"),
        ("log-c", orjson.dumps(native(301)).decode()),
        ("log-d", orjson.dumps(native(301)).decode()),  # the same trajectory logged twice
    ]
    source = str(tmp_path / "raw_logs")
    spark.createDataFrame(rows, "log_id string, payload string").write.format("delta").save(source)
    cfg = cfg_with(f"ingest.source_table={source}", "ingest.raw_column=payload", "ingest.id_column=log_id")
    stats = ingest.run(cfg, spark)
    assert (stats["read"], stats["new"], stats["quarantined"], stats["duplicates"]) == (4, 2, 2, 1)
    dup = spark.sql(f"SELECT count(*) n FROM delta.`{warehouse}/trajectories` WHERE trajectory_id = 'native-301'")
    assert dup.first()["n"] == 1
    row = spark.sql(
        f"SELECT * FROM delta.`{warehouse}/quarantine` WHERE source = '{source}' AND locator = 'log_id=log-b'"
    ).first()
    assert (row["locator"], row["raw"]) == ("log_id=log-b", "{broken")
    assert row["reason"].startswith("invalid JSON")
    located = spark.sql(
        f"SELECT locator FROM delta.`{warehouse}/trajectories` WHERE trajectory_id = 'chat-300'"
    )
    assert located.first()["locator"] == "log_id=log-a"
    assert ingest.run(cfg, spark)["new"] == 0


def test_missing_inputs_raise_input_error(spark, cfg_with, tmp_path):
    with pytest.raises(InputError, match="does-not-exist"):
        ingest.run(cfg_with(f"ingest.paths=[{tmp_path / 'does-not-exist.jsonl'}]"), spark)
    with pytest.raises(InputError, match="is not a Delta table"):
        ingest.run(cfg_with(f"ingest.source_table={tmp_path / 'nope'}"), spark)
