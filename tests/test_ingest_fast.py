"""The msgspec fast path of ingestion gives exactly what the general path gives, or nothing.

Seeded random native-format records, valid and broken in many ways, serialised with random key orders and
spacing: wherever `fast_native` returns a Trajectory, `convert(orjson.loads(...))` returns the same one, field
for field (texts and content hash byte for byte); wherever the general path rejects a record, the fast path
returns None. Plain records must take the fast path, so the comparison is never vacuous.
"""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest

from cso_lib.errors import RecordError
from cso_lib.ingest import convert, fast_native, ingest_one

TEXTS = ["plain", "", "  ", "é ü 中文 😀", 'quote " and \\ backslash', "ctl \x01\x1f\x7f tab\t nl\n", "\u2028\u2029", "/"]


def _shuffled(rng: random.Random, obj: dict[str, Any]) -> dict[str, Any]:
    items = list(obj.items())
    rng.shuffle(items)
    return dict(items)


def _call(rng: random.Random, j: int) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": rng.choice(["search", "lookup", "final_answer"]),
                          "arguments": json.dumps({"q": rng.choice(TEXTS), "n": j})}
    call: dict[str, Any] = {"id": f"call_{j}", "function": _shuffled(rng, fn)}
    if rng.random() < 0.7:
        call["type"] = "function"
    return _shuffled(rng, call)


def _step(rng: random.Random, i: int) -> dict[str, Any]:
    action: dict[str, Any] = {}
    if rng.random() < 0.3:
        action["role"] = "assistant"
    kind = rng.random()
    if kind < 0.6:
        action["tool_calls"] = [_call(rng, i * 10 + j) for j in range(rng.choice([1, 1, 2]))]
        if rng.random() < 0.6:
            action["content"] = rng.choice([None, "thinking " + rng.choice(TEXTS)])
    else:
        action["content"] = "answer " + rng.choice(TEXTS)
        if rng.random() < 0.3:
            action["tool_calls"] = rng.choice([None, []])
    step: dict[str, Any] = {"action": _shuffled(rng, action)}
    r = rng.random()
    if r < 0.6:
        step["observation"] = "obs " + rng.choice(TEXTS)
    elif r < 0.8:
        step["observation"] = None
    return _shuffled(rng, step)


def plain_record(rng: random.Random, i: int) -> dict[str, Any]:
    """A valid native record with only the fields and types the fast path handles."""
    rec: dict[str, Any] = {
        "trajectory_id": f"traj-{i}",
        "task_id": f"task-{i % 7}",
        "query": "q " + rng.choice(TEXTS),
        "policy_model": "m",
        "policy_version": "v1",
        "steps": [_step(rng, t) for t in range(rng.randint(1, 5))],
    }
    if rng.random() < 0.8:
        rec["outcome"] = rng.choice([0, 1])
    else:
        rec["reward"] = rng.choice([0, 1, 0.25, 1.0])
    if rng.random() < 0.5:
        rec["reward"] = rng.choice([None, 0.5, 0, 1])
        rec.setdefault("outcome", 0)
    for key, values in {
        "ground_truth": [None, "42", "ans " + rng.choice(TEXTS)],
        "env": [None, "sim", "web"],
        "round": [None, 0, 3],
        "system_prompt": [None, "You are " + rng.choice(TEXTS)],
        "tools": [None, [{"type": "function", "function": {"name": "search", "parameters": {"x": 1.5e-7}}}]],
        "metadata": [None, {"a": [1, 2.5, {"b": None}], "z": "é"}, {}],
    }.items():
        if rng.random() < 0.6:
            rec[key] = rng.choice(values)
    return _shuffled(rng, rec)


def _set(obj: Any, path: list[Any], value: Any) -> None:
    for key in path[:-1]:
        obj = obj[key]
    if value is _DROP:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


_DROP = object()
MUTATIONS: list[tuple[list[Any], Any]] = [
    (["trajectory_id"], ""), (["trajectory_id"], "x" * 513), (["trajectory_id"], 5), (["trajectory_id"], _DROP),
    (["task_id"], "  "), (["query"], None), (["policy_model"], 1), (["policy_version"], _DROP),
    (["outcome"], 2), (["outcome"], True), (["outcome"], 1.0), (["outcome"], "1"), (["reward"], 1.5),
    (["reward"], False), (["reward"], "0.5"), (["round"], -1), (["round"], True), (["round"], 2.0),
    (["env"], ""), (["env"], 3), (["ground_truth"], 7), (["ground_truth"], [1, "a"]), (["ground_truth"], 2.5),
    (["ground_truth"], True), (["system_prompt"], 3), (["metadata"], [1]), (["metadata"], "x"),
    (["metadata"], {"big": 2**70}), (["tools"], {"a": 1}), (["tools"], [{"function": {}}]), (["tools"], [1]),
    (["steps"], []), (["steps"], {}), (["steps", 0], 5), (["steps", 0, "action"], _DROP),
    (["steps", 0, "action"], "text"), (["steps", 0, "action", "role"], "user"),
    (["steps", 0, "action", "role"], None), (["steps", 0, "action", "content"], ["part"]),
    (["steps", 0, "action", "content"], [{"type": "text", "text": "x"}]), (["steps", 0, "action", "content"], 3),
    (["steps", 0, "action", "tool_calls"], "x"), (["steps", 0, "observation"], 3),
    (["steps", 0, "observation"], ["a"]), (["steps", 0, "extra"], 1), (["steps", 0, "action", "refusal"], None),
    (["extra_top_level"], {"k": 1}), (["messages"], []), (["traj"], []),
]
CALL_MUTATIONS: list[tuple[list[Any], Any]] = [
    (["id"], ""), (["id"], None), (["id"], _DROP), (["type"], None), (["type"], 3), (["function"], _DROP),
    (["function"], "f"), (["function", "name"], ""), (["function", "name"], _DROP),
    (["function", "arguments"], "{'a': 1}"), (["function", "arguments"], "[1, 2]"),
    (["function", "arguments"], {"a": 1}), (["function", "arguments"], '{"a": 1} x'), (["extra"], 1),
    (["function", "extra"], 1),
]


def _serialise(rng: random.Random, rec: Any) -> bytes:
    style = rng.random()
    if style < 0.5:
        try:
            return orjson.dumps(rec)
        except TypeError:  # an integer past 64 bits: orjson cannot write it, json can
            return json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode()
    if style < 0.8:
        return json.dumps(rec).encode()  # ", " and ": " separators
    return json.dumps(rec, indent=1, ensure_ascii=rng.random() < 0.5).replace("\n", " ").encode()


def _general(data: bytes) -> Any:
    try:
        return convert(orjson.loads(data), default_env="default")
    except (RecordError, orjson.JSONDecodeError) as e:
        return e


def _check(data: bytes) -> bool:
    """fast == general where fast answers; None where general rejects. True when fast answered."""
    fast, general = fast_native(data, "default"), _general(data)
    if isinstance(general, Exception):
        assert fast is None, f"fast path accepted a record the general path rejects ({general}): {data[:300]!r}"
        return False
    if fast is not None:
        assert fast == general, f"fast and general paths differ on {data[:300]!r}"
    assert ingest_one(data, len(data), 1 << 20, "default") == general
    return fast is not None


@pytest.mark.parametrize("seed", range(4))
def test_plain_records_take_the_fast_path_and_match_the_general_path(seed):
    rng = random.Random(seed)
    answered = [_check(_serialise(rng, plain_record(rng, i))) for i in range(400)]
    assert all(answered), f"{answered.count(False)} plain records fell back to the general path"


@pytest.mark.parametrize("seed", range(3))
def test_every_mutation_is_rejected_or_converted_exactly_as_by_the_general_path(seed):
    rng = random.Random(100 + seed)
    outcomes = {"fast": 0, "fallback": 0}
    for i, (path, value) in enumerate(MUTATIONS * 3):
        rec = json.loads(json.dumps(plain_record(rng, i)))
        _set(rec, path, value)
        outcomes["fast" if _check(_serialise(rng, rec)) else "fallback"] += 1
    for i, (path, value) in enumerate(CALL_MUTATIONS * 3):
        rec = plain_record(rng, i)
        rec["steps"][0]["action"]["tool_calls"] = [_call(rng, 0)]
        rec = json.loads(json.dumps(rec))
        _set(rec["steps"][0]["action"]["tool_calls"][0], path, value)
        outcomes["fast" if _check(_serialise(rng, rec)) else "fallback"] += 1
    assert outcomes["fast"] > 0 and outcomes["fallback"] > 0, outcomes


def test_key_order_does_not_change_the_stored_text_or_the_hash():
    rng = random.Random(7)
    rec = plain_record(rng, 1)
    rec["steps"][0]["action"] = {"tool_calls": [{"function": {"arguments": "{}", "name": "f"}, "type": "function",
                                                  "id": "c1"}], "content": "x", "role": "assistant"}
    reordered = json.loads(json.dumps(rec))
    reordered["steps"][0]["action"] = {"role": "assistant", "content": "x", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    a, b = convert(rec, "d"), convert(reordered, "d")
    assert a.steps[0].action == b.steps[0].action == (
        '{"role":"assistant","content":"x","tool_calls":[{"id":"c1","type":"function",'
        '"function":{"name":"f","arguments":"{}"}}]}')
    assert a.content_hash == b.content_hash
    assert fast_native(orjson.dumps(rec), "d") == a


def test_duplicate_keys_keep_the_last_value_on_both_paths():
    data = b'{"trajectory_id":"a","trajectory_id":"b","task_id":"t","query":"q","policy_model":"m",' \
           b'"policy_version":"v","outcome":0,"steps":[{"action":{"content":"x"}}]}'
    assert fast_native(data, "d").trajectory_id == "b" == _general(data).trajectory_id
