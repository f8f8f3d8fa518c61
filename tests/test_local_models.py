"""The tiny local model and the in-process transformers policy."""

from __future__ import annotations

import json

import pytest

from cso_lib.local_models import parse_hermes
from cso_lib.sim.world import SYSTEM_PROMPT, TOOLS, SimWorld

STATE = [
    {"role": "system", "content": SYSTEM_PROMPT},
    {"role": "user", "content": "Who is it?"},
    {"role": "assistant", "content": "Searching.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "search", "arguments": '{"query": "Ann Lee"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "P0001: Ann Lee (person)"},
]


def test_parse_hermes_malformed_and_multiple_calls():
    m = parse_hermes('a <tool_call>{"name": "lookup", "arguments": {"entity_id": "P1", "attribute": "employer"}}'
                     '</tool_call><tool_call>{"name": "search", "arguments": {oops</tool_call>')
    assert m["content"] == "a"
    first, second = m["tool_calls"]
    assert json.loads(first["function"]["arguments"]) == {"entity_id": "P1", "attribute": "employer"}
    assert second["function"]["name"] == "search"  # read from the broken JSON
    assert second["function"]["arguments"].startswith('{"name": "search"')  # raw text: the env reports the error
    assert [c["id"] for c in m["tool_calls"]] == ["call_0", "call_1"]
    # An unterminated block (generation stopped mid-call) is still a call.
    assert parse_hermes('<tool_call>{"name": "final_answer", "arguments": {"answer": "7"}}')["tool_calls"]
    assert parse_hermes('<tool_call>[1, 2]</tool_call>')["tool_calls"][0]["function"]["name"] == ""


@pytest.mark.slow
def test_tiny_model_template_round_trip(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    full = tok.apply_chat_template(STATE + [{"role": "assistant", "content": "done"}], tools=TOOLS, tokenize=False)
    prefix = tok.apply_chat_template(STATE, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert full.startswith(prefix)  # what TRL relies on to split prompt from completion
    assert '<tool_call>{"name": "search", "arguments": {"query": "Ann Lee"}}</tool_call>' in full
    assert '"name": "lookup"' in prefix  # the tools are in the system turn
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == full  # byte-level BPE: lossless
    # The rendered assistant turn parses back to the same call.
    turn = full.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    call = parse_hermes(turn)["tool_calls"][0]["function"]
    assert call["name"] == "search" and json.loads(call["arguments"]) == {"query": "Ann Lee"}


@pytest.mark.slow
def test_transformers_policy_acts_in_batches(tiny_model_dir):
    from cso_lib.config import load_config
    from cso_lib.models import StepRequest, build_models

    cfg = load_config(None, ["policy.provider=transformers", f"policy.model={tiny_model_dir}",
                             "policy.params={max_tokens: 24, batch_size: 3}"])
    policy = build_models(cfg).policy
    world = SimWorld(n_tasks=5)
    reqs = [StepRequest(f"t{i}", tid, "sim", 1, [{"role": "system", "content": SYSTEM_PROMPT},
                                                 {"role": "user", "content": world.task(tid).query}], TOOLS)
            for i, tid in enumerate(world.task_ids())]
    long = StepRequest("long", world.task_ids()[0], "sim", 1,
                       [{"role": "user", "content": "word " * 9000}], TOOLS)
    out = policy.act(reqs + [long])
    assert len(out) == 6 and all(m["role"] == "assistant" for m in out)
    assert "exceeds the model's 8192 positions" in out[-1]["content"]
    assert policy.act(reqs) == out[:5]  # same batch of states, same actions
    again = policy.act(reqs[:2])  # a different batch: still valid messages
    assert all(isinstance(m.get("content"), str) for m in again)
