"""Splitting trajectories into steps and rebuilding s_t. Pure Python."""

from cso_lib.messages import (
    assistant,
    call,
    final_answer,
    iter_states,
    native_step,
    signature,
    split_messages,
    state_at,
    to_struct,
)


def _trajectory():
    return [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        assistant("look", [call("c0", "lookup", {"entity_id": "P1", "attribute": "a"})]),
        {"role": "tool", "tool_call_id": "c0", "content": "P1.a = T2"},
        {"role": "user", "content": "hurry"},
        assistant(None, [call("c1", "final_answer", {"answer": "T2"})]),
    ]


def test_split_and_rebuild_roundtrip():
    msgs = _trajectory()
    preamble, steps = split_messages(msgs)
    assert [m["role"] for m in preamble] == ["system", "user"]
    assert len(steps) == 2 and [m["role"] for m in steps[0][1]] == ["tool", "user"]
    assert state_at(preamble, steps, 2) == msgs  # the whole trajectory once every step is in the state
    for t, state in iter_states(preamble, steps):
        assert state == msgs[: [2, 5][t]]  # exactly the messages before action t


def test_native_step_observation_answers_the_call():
    action, obs = native_step({"content": "x", "tool_calls": [call("c9", "search", {"query": "a"})]}, "hits")
    assert action["role"] == "assistant" and obs == [{"role": "tool", "tool_call_id": "c9", "content": "hits"}]
    assert native_step({"content": "just text"}, None)[1] == []


def test_final_answer_and_signature():
    msgs = _trajectory()
    assert final_answer(msgs[5]) == "T2" and final_answer(msgs[2]) is None
    assert signature(msgs[2]) == signature(assistant("other", [call("zz", "lookup", {"attribute": "a", "entity_id": "P1"})]))
    assert signature(msgs[2]) != signature(msgs[5])


def test_to_struct_has_fixed_fields():
    s = to_struct({"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {"x": 1}}}]})
    assert s["tool_calls"][0]["function"]["arguments"] == '{"x": 1}' and s["tool_call_id"] is None
