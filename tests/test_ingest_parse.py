"""Parsing, validation and conversion of single raw records (cso_lib.ingest): pure Python, no Spark."""

from __future__ import annotations

import io
import json
from typing import Any

import orjson
import pytest

from cso_lib.errors import RecordError
from cso_lib.ingest import TAU_BENCH_ENV, convert, iter_jsonl, load, raw_head, record_id
from cso_lib.messages import call


def native(**overrides: Any) -> dict[str, Any]:
    rec = {
        "trajectory_id": "t-1",
        "task_id": "task-1",
        "query": "Who founded Acme?",
        "outcome": 0,
        "policy_model": "policy",
        "policy_version": "v1",
        "system_prompt": "You are helpful.",
        "tools": [{"type": "function", "function": {"name": "search"}}],
        "steps": [
            {
                "action": {"content": "Let me search.", "tool_calls": [call("c0", "search", {"q": "Acme"})]},
                "observation": "Acme was founded by Ada.",
            },
            {
                "action": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call("c1", "final_answer", {"answer": "Ada"})],
                }
            },
        ],
    }
    return rec | overrides


def messages(**overrides: Any) -> dict[str, Any]:
    rec = native()
    del rec["steps"], rec["system_prompt"]
    rec["messages"] = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Who founded Acme?"},
        {"role": "assistant", "content": None, "tool_calls": [call("c0", "search", {"q": "Acme"})]},
        {"role": "tool", "tool_call_id": "c0", "content": "Acme was founded by Ada."},
        {"role": "assistant", "content": "Ada."},
        {"role": "user", "content": "Thanks!"},
    ]
    return rec | overrides


def with_step_action(**action: Any) -> dict[str, Any]:
    return native(steps=[{"action": action, "observation": None}])


def with_arguments(arguments: Any) -> dict[str, Any]:
    fn = {"name": "search", "arguments": arguments}
    return with_step_action(content=None, tool_calls=[{"id": "c0", "type": "function", "function": fn}])


def without(rec: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in keys}


def check(rec: Any, default_env: str = "unknown"):
    """Serialise, load and convert one record, as the stage does with a JSONL line."""
    data = orjson.dumps(rec)
    return convert(load(data, len(data), 1 << 20), default_env)


def test_native_record_converts_to_preamble_and_steps():
    t = check(native())
    assert (t.trajectory_id, t.input_format, t.n_steps, t.outcome, t.reward, t.env) == (
        "t-1",
        "native",
        2,
        0,
        None,
        "unknown",
    )
    assert json.loads(t.preamble) == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Who founded Acme?"},
    ]
    action, observations = json.loads(t.steps[0].action), json.loads(t.steps[0].observations)
    assert action["role"] == "assistant" and action["tool_calls"][0]["function"]["name"] == "search"
    assert observations == [{"role": "tool", "tool_call_id": "c0", "content": "Acme was founded by Ada."}]
    assert (t.steps[0].action_tool, t.steps[1].action_tool, t.steps[1].observations) == (
        "search",
        "final_answer",
        "[]",
    )
    assert json.loads(t.tools) == [{"type": "function", "function": {"name": "search"}}]


def test_messages_record_splits_on_assistant_turns():
    t = check(messages(env="web", round=2, reward=0.5, ground_truth=["Ada", "Bob"], metadata={"k": 1}))
    assert (t.input_format, t.n_steps, t.env, t.round, t.reward, t.ground_truth, t.metadata) == (
        "messages",
        2,
        "web",
        2,
        0.5,
        '["Ada","Bob"]',
        '{"k":1}',
    )
    assert [m["role"] for m in json.loads(t.preamble)] == ["system", "user"]
    assert [m["role"] for m in json.loads(t.steps[1].observations)] == ["user"]


def test_messages_without_system_or_user_get_them_from_system_prompt_and_query():
    rec = messages(system_prompt="Be brief.")
    rec["messages"] = rec["messages"][2:]
    pre = json.loads(check(rec).preamble)
    assert pre == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who founded Acme?"},
    ]


def test_outcome_is_derived_from_reward():
    assert (
        check(without(native(reward=1), "outcome")).outcome,
        check(without(native(reward=0.9), "outcome")).outcome,
    ) == (1, 0)


def test_content_hash_is_stable_and_content_sensitive():
    a, b = check(native()), check(json.loads(json.dumps(native(), indent=2)))
    assert a.content_hash == b.content_hash and len(a.content_hash) == 64
    assert check(native(query="Who founded Acme Inc?")).content_hash != a.content_hash
    assert check(native(), default_env="other").content_hash != a.content_hash


def test_tau_bench_record():
    rec = {
        "task_id": 7,
        "trial": 2,
        "reward": 0.0,
        "info": {"task": {"actions": [{"name": "book", "kwargs": {"x": 1}}]}},
        "traj": [m for m in messages()["messages"]],
    }
    t = check(rec)
    assert (t.trajectory_id, t.task_id, t.outcome, t.reward, t.env, t.input_format) == (
        f"{TAU_BENCH_ENV}/7/2",
        "7",
        0,
        0.0,
        TAU_BENCH_ENV,
        "tau-bench",
    )
    assert (t.query, t.policy_model, t.policy_version) == (
        "Who founded Acme?",
        "gpt-4o",
        "tau-bench-historical",
    )
    assert json.loads(t.ground_truth) == [{"name": "book", "kwargs": {"x": 1}}]
    assert json.loads(t.metadata)["trial"] == 2
    assert record_id(rec) == f"{TAU_BENCH_ENV}/7/2"


def _bad_tool_message() -> dict[str, Any]:
    rec = messages()
    rec["messages"][3]["tool_call_id"] = "nope"
    return rec


def _unknown_role() -> dict[str, Any]:
    rec = messages()
    rec["messages"][1]["role"] = "robot"
    return rec


MALFORMED = [
    ("not-an-object", 42, "record must be a JSON object, got int 42"),
    ("string-record", "hello", "record must be a JSON object, got str"),
    ("missing-trajectory-id", without(native(), "trajectory_id"), "trajectory_id is missing"),
    ("empty-trajectory-id", native(trajectory_id=""), "trajectory_id must be a non-empty string"),
    ("numeric-trajectory-id", native(trajectory_id=12), "trajectory_id must be a non-empty string"),
    ("missing-task-id", without(native(), "task_id"), "task_id is missing"),
    ("missing-query", without(native(), "query"), "query is missing"),
    ("empty-query", native(query="  "), "query is empty"),
    ("missing-policy-model", without(native(), "policy_model"), "policy_model is missing"),
    ("missing-policy-version", without(native(), "policy_version"), "policy_version is missing"),
    ("no-outcome-no-reward", without(native(), "outcome"), "outcome is missing and there is no reward"),
    ("outcome-not-binary", native(outcome=2), "outcome must be 0 or 1, got 2"),
    ("outcome-bool", native(outcome=True), "outcome must be 0 or 1, got True"),
    ("reward-out-of-range", native(reward=1.5), "reward must be a number in [0, 1], got 1.5"),
    ("reward-not-number", native(reward="high"), "reward must be a number in [0, 1], got 'high'"),
    ("neither-steps-nor-messages", without(native(), "steps"), "record has neither steps nor messages"),
    (
        "both-steps-and-messages",
        native(messages=messages()["messages"]),
        "record has both steps and messages",
    ),
    ("empty-steps", native(steps=[]), "steps must be a non-empty list"),
    ("step-without-action", native(steps=[{"observation": "x"}]), "steps[0].action is missing"),
    ("action-empty", with_step_action(content=None), "steps[0].action has neither content nor tool_calls"),
    (
        "action-wrong-role",
        with_step_action(role="user", content="hi"),
        "steps[0].action.role must be 'assistant'",
    ),
    (
        "observation-not-text",
        native(steps=[{"action": {"content": "a"}, "observation": {"x": 1}}]),
        "steps[0].observation must be text or null",
    ),
    (
        "tool-call-without-name",
        with_step_action(tool_calls=[{"id": "c0", "function": {"arguments": "{}"}}]),
        "steps[0].action.tool_calls[0].function.name is missing",
    ),
    (
        "tool-call-without-id",
        with_step_action(tool_calls=[{"function": {"name": "f", "arguments": "{}"}}]),
        "steps[0].action.tool_calls[0].id is missing",
    ),
    (
        "arguments-invalid-json",
        with_arguments('{"q": '),
        "steps[0].action.tool_calls[0].function.arguments is not valid JSON: ",
    ),
    (
        "arguments-not-object",
        with_arguments("[1, 2]"),
        "steps[0].action.tool_calls[0].function.arguments is not a JSON object",
    ),
    (
        "arguments-not-text",
        with_arguments({"q": 1}),
        "steps[0].action.tool_calls[0].function.arguments must be a JSON object as text",
    ),
    (
        "unknown-role",
        _unknown_role(),
        "messages[1].role must be one of system, user, assistant, tool; got 'robot'",
    ),
    (
        "orphan-tool-message",
        _bad_tool_message(),
        "messages[3].tool_call_id 'nope' matches no earlier tool call",
    ),
    (
        "no-assistant-message",
        messages(messages=[{"role": "user", "content": "hi"}]),
        "messages has no assistant message",
    ),
    (
        "tools-without-name",
        native(tools=[{"type": "function", "function": {}}]),
        "tools[0].function.name is missing",
    ),
    (
        "ground-truth-object",
        native(ground_truth={"a": 1}),
        "ground_truth must be a string, number, list or null",
    ),
    ("round-negative", native(round=-1), "round must be >= 0"),
    (
        "tau-bench-without-reward",
        {"task_id": 1, "trial": 0, "traj": messages()["messages"]},
        "reward is missing",
    ),
]


@pytest.mark.parametrize(("rec", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_record_is_rejected_naming_the_field(rec, reason):
    with pytest.raises(RecordError) as e:
        check(rec)
    assert reason in str(e.value)


def test_invalid_json_and_oversized_records():
    with pytest.raises(RecordError, match="^invalid JSON: "):
        load(b'{"trajectory_id": "t-1",', 24, 1 << 20)
    with pytest.raises(RecordError, match="^record is 5000 bytes, over ingest.max_record_bytes=4096$"):
        load(b"x" * 5000, 5000, 4096)


def test_raw_head_keeps_4_kib_and_survives_cut_utf8():
    assert len(raw_head(b"a" * 10_000)) == 4096
    assert raw_head(b"a" * 4095 + "é".encode()).endswith("\ufffd")


def _jsonl(n: int) -> bytes:
    lines = []
    for i in range(n):
        lines.append(orjson.dumps({"i": i, "pad": "x" * (i * 7 % 50)}))
        if i % 5 == 0:
            lines.append(b"   ")  # blank lines are not records
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("split", [1, 7, 64, 100, 10_000])
def test_splits_at_any_byte_boundary_read_every_record_once(split):
    data = _jsonl(40)
    f = io.BytesIO(data)
    got = [
        r
        for start in range(0, len(data), split)
        for r in iter_jsonl(f, start, min(start + split, len(data)), 1 << 20)
    ]
    assert [orjson.loads(r.data)["i"] for r in got] == list(range(40))
    assert all(data[r.offset : r.offset + r.size] == r.data for r in got)


def test_line_numbers_count_blank_lines_and_are_known_from_byte_zero_only():
    data = b'{"a": 1}\n\n{"b": 2}\r\n{"c": 3}'
    f = io.BytesIO(data)
    assert [(r.line, r.data) for r in iter_jsonl(f, 0, len(data), 1024)] == [
        (1, b'{"a": 1}'),
        (3, b'{"b": 2}'),
        (4, b'{"c": 3}'),
    ]
    assert [(r.line, r.offset) for r in iter_jsonl(f, 5, len(data), 1024)] == [(None, 10), (None, 20)]


def test_oversized_line_comes_back_truncated_with_its_size_and_the_next_line_survives():
    big = b'{"x": "' + b"y" * 20_000 + b'"}'
    f = io.BytesIO(big + b"\n" + b'{"ok": 1}\n')
    first, second = iter_jsonl(f, 0, len(big) + 11, 8192)
    assert (first.size, len(first.data), second.data, second.line) == (len(big) + 1, 4096, b'{"ok": 1}', 2)
    with pytest.raises(RecordError, match="over ingest.max_record_bytes=8192"):
        load(first.data, first.size, 8192)
