"""Trainer formats without Spark: LLaMA-Factory sharegpt ranking records, stepwise supervision, Wilson intervals,
the truncation guard of the DPO job."""

import json

import pytest

from cso_lib.errors import ExportError, TrainError
from cso_lib.exports import (
    llamafactory_dataset_info,
    llamafactory_record,
    stepwise_records,
    wilson_interval,
)
from cso_lib.messages import assistant, call
from cso_lib.train import check_tracker, check_truncation, truncation_report

# ---- LLaMA-Factory's documented format (hiyouga/LLaMA-Factory data/README.md, "Sharegpt Format" /
# "Preference Dataset", and the sharegpt converter it documents): an independent checker.
ROLE_TAG, CONTENT_TAG = "from", "value"
ODD_TAGS, EVEN_TAGS = ("human", "observation"), ("gpt", "function_call")
INFO_KEYS = {"hf_hub_url", "ms_hub_url", "script_url", "file_name", "file_sha1", "subset", "folder", "ranking",
             "formatting", "columns", "tags", "split", "num_samples"}
COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios",
               "chosen", "rejected", "kto_tag"}


def validate_sharegpt_ranking(record: dict, info: dict) -> None:
    """Raise AssertionError where `record` breaks the documented sharegpt preference format under `info`."""
    assert set(info) <= INFO_KEYS and info["formatting"] == "sharegpt" and info["ranking"] is True
    assert set(info["columns"]) <= COLUMN_KEYS
    cols = info["columns"]
    turns = record[cols.get("messages", "conversations")]
    assert isinstance(turns, list) and turns, "conversations must be a non-empty list"
    for i, turn in enumerate(turns):
        assert set(turn) == {ROLE_TAG, CONTENT_TAG}, turn
        assert isinstance(turn[CONTENT_TAG], str)
        want = ODD_TAGS if i % 2 == 0 else EVEN_TAGS  # 1-based odd positions: human / observation
        assert turn[ROLE_TAG] in want, f"turn {i} is {turn[ROLE_TAG]!r}, expected one of {want}"
    assert len(turns) % 2 == 1, "a preference record's conversations end with a human / observation turn"
    for side in ("chosen", "rejected"):
        turn = record[cols[side]]
        assert isinstance(turn, dict) and set(turn) == {ROLE_TAG, CONTENT_TAG}
        assert turn[ROLE_TAG] in EVEN_TAGS
    for turn in [*turns, record[cols["chosen"]], record[cols["rejected"]]]:
        if turn[ROLE_TAG] == "function_call":  # FunctionFormatter: JSON {"name", "arguments"} or a list of them
            calls = json.loads(turn[CONTENT_TAG])
            for c in calls if isinstance(calls, list) else [calls]:
                assert isinstance(c["name"], str) and isinstance(c["arguments"], dict)
    if "system" in cols:
        assert isinstance(record[cols["system"]], str)
    if "tools" in cols:
        tools = record[cols["tools"]]
        assert isinstance(tools, str)
        if tools:
            assert isinstance(json.loads(tools), list)


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]


def _pair(prompt_tail=(), chosen=None, rejected=None):
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Who?"}, *prompt_tail]
    return {"prompt": prompt,
            "chosen": [chosen or assistant(None, [call("c1", "lookup", {"id": "e1"})])],
            "rejected": [rejected or assistant("I guess", [call("c1", "lookup", {"id": "e2"})])],
            "tools": json.dumps(TOOLS)}


def test_llamafactory_record_keeps_tool_calls_and_alternates():
    tail = [assistant("thinking", [call("c0", "lookup", {"id": "e0"}), call("c9", "lookup", {"id": "e9"})]),
            {"role": "tool", "tool_call_id": "c0", "content": "r0"},
            {"role": "tool", "tool_call_id": "c9", "content": "r9"},
            {"role": "user", "content": "go on"}]
    rec, notes = llamafactory_record(_pair(tail))
    info = llamafactory_dataset_info("cso", "f.jsonl")["cso"]
    validate_sharegpt_ranking(rec, info)
    assert rec["system"] == "sys" and json.loads(rec["tools"]) == TOOLS
    assert [t["from"] for t in rec["conversations"]] == ["human", "function_call", "observation"]
    assert json.loads(rec["conversations"][1]["value"]) == [{"name": "lookup", "arguments": {"id": "e0"}},
                                                           {"name": "lookup", "arguments": {"id": "e9"}}]
    assert rec["conversations"][2]["value"] == "r0\nr9\ngo on"  # parallel results and the user turn: one turn
    assert json.loads(rec["chosen"]["value"]) == {"name": "lookup", "arguments": {"id": "e1"}}
    assert json.loads(rec["rejected"]["value"])["arguments"] == {"id": "e2"}
    assert notes == ["assistant_text_dropped", "odd_turns_merged"]


def test_llamafactory_record_plain_answers_and_errors():
    rec, _ = llamafactory_record(_pair(chosen=assistant("Paris"), rejected=assistant("Lyon")))
    assert rec["chosen"] == {"from": "gpt", "value": "Paris"} and rec["rejected"] == {"from": "gpt", "value": "Lyon"}
    bad = _pair(chosen=assistant(None, [{"id": "x", "type": "function",
                                         "function": {"name": "lookup", "arguments": "{not json"}}]))
    with pytest.raises(ExportError, match=r"chosen\[0\]\.tool_calls\[0\]\.function\.arguments"):
        llamafactory_record(bad)
    ends_with_assistant = _pair([assistant("x")])
    with pytest.raises(ExportError, match="must end with a user or tool message"):
        llamafactory_record(ends_with_assistant)


def test_the_checker_rejects_what_llamafactory_rejects():
    info = llamafactory_dataset_info("cso", "f.jsonl")["cso"]
    rec, _ = llamafactory_record(_pair())
    broken = {**rec, "conversations": rec["conversations"] + [{"from": "gpt", "value": "x"}]}
    with pytest.raises(AssertionError):
        validate_sharegpt_ranking(broken, info)
    with pytest.raises(AssertionError):
        validate_sharegpt_ranking({**rec, "chosen": {"from": "human", "value": "x"}}, info)


def test_stepwise_records_follow_trl_stepwise_supervision():
    a0 = assistant(None, [call("c0", "search", {"q": "x"})])
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, a0,
              {"role": "tool", "tool_call_id": "c0", "content": "hits"}]
    rejected, chosen = assistant(None, [call("c1", "lookup", {"id": "bad"})]), assistant(None, [call("c1", "lookup", {"id": "ok"})])
    cont = [chosen, {"role": "tool", "tool_call_id": "c1", "content": "val"}, assistant(None, [call("c2", "final_answer", {"answer": "A"})])]
    logged, verified = stepwise_records(prompt, rejected, chosen, cont)
    for ex in (logged, verified):
        assert isinstance(ex["prompt"], str) and len(ex["completions"]) == len(ex["labels"])
        assert all(isinstance(c, str) for c in ex["completions"])
    assert logged["labels"] == [True, False] and '"bad"' in logged["completions"][-1]
    assert verified["labels"] == [True, True, True] and '"ok"' in verified["completions"][1]
    assert "[tool] val" in verified["completions"][1] and "final_answer" in verified["completions"][2]


def test_wilson_interval():
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.15 < hi < 0.17
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_truncation_guard_and_tracker_errors():
    report = truncation_report([100, 200, 5000, 6000], 4096)
    assert report["truncated"] == 2 and report["share"] == 0.5
    check_truncation(report, 0.5)
    with pytest.raises(TrainError, match=r"2 of 4 pairs \(50.0%\) are longer than train.max_length=4096"):
        check_truncation(report, 0.1)
    assert check_tracker("none") == []
    try:
        import mlflow  # noqa: F401
    except ImportError:
        with pytest.raises(TrainError, match="pip install mlflow"):
            check_tracker("mlflow")
