"""The model-call layer (cso_lib.llm): conversion, hashing, limits and cost (pure), and clients, retries,
rate adaptation, batch APIs and key hygiene against the fault-injecting loopback server (slow)."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes.llm_server import FakeLLMServer

from cso_lib.errors import ConfigError, LLMBatchError, LLMRequestError, LLMResponseError
from cso_lib.llm import (
    AdaptiveLimiter,
    AnthropicBatchClient,
    AnthropicClient,
    ChatRequest,
    ChatResult,
    OpenAIBatchClient,
    OpenAICompatClient,
    RateLimits,
    Usage,
    cost_usd,
    run_all,
    run_all_sync,
)
from cso_lib.llm.anthropic import (
    anthropic_body,
    from_anthropic_message,
    to_anthropic_messages,
    to_anthropic_tools,
)
from cso_lib.llm.limits import Ticket, parse_duration, parse_reset, parse_retry_after
from cso_lib.llm.openai_compat import openai_body, parse_openai_response
from cso_lib.llm.types import request_hash

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look an entity up.",
                                           "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                          "required": ["query"]}}}]
SCORE_SCHEMA = {"type": "object", "properties": {"reasoning": {"type": "string"}, "score": {"type": "number"}},
                "required": ["reasoning", "score"], "additionalProperties": False}
TRAJ = [
    {"role": "system", "content": "You are an agent."},
    {"role": "user", "content": "Who directed the film?"},
    {"role": "assistant", "content": "Searching.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"query": "film"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "film: directed by D"},
]


def prm_request(i: int, **kw) -> ChatRequest:
    msgs = [{"role": "system", "content": "Judge the action. Answer in JSON with a score."},
            {"role": "user", "content": f"trajectory {i // 5}"}, {"role": "user", "content": f"action {i}"}]
    return ChatRequest(model="judge", messages=msgs, response_format="json", params={"temperature": 0}, **kw)


# ---- pure: types, hashing ---------------------------------------------------------------------------------
def test_request_hash_is_canonical_and_ignores_cache_key_and_metadata():
    a = ChatRequest(model="m", messages=[{"role": "user", "content": "x", "name": "u"}], params={"temperature": 0.2})
    b = ChatRequest(model="m", messages=[{"name": "u", "content": "x", "role": "user"}],
                    params={"temperature": 0.2, "seed": None}, cache_key="traj-1", metadata={"step": 3})
    assert a.hash("openai") == b.hash("openai")
    assert a.hash("openai") != a.hash("anthropic")
    assert a.hash("openai") != ChatRequest(model="m", messages=a.messages, params={"temperature": 0.3}).hash("openai")
    assert a.hash("openai") == request_hash("openai", "m", {"temperature": 0.2}, a.messages, None, None)
    assert a.hash("openai") != ChatRequest(model="m", messages=a.messages, params={"temperature": 0.2},
                                           response_format="json").hash("openai")


def test_bad_requests_are_refused_with_the_field():
    with pytest.raises(LLMRequestError, match="messages"):
        ChatRequest(model="m", messages=[])
    with pytest.raises(LLMRequestError, match=r"messages\[0\]"):
        ChatRequest(model="m", messages=[{"content": "no role"}])
    with pytest.raises(LLMRequestError, match="response_format"):
        ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], response_format="yaml")
    with pytest.raises(LLMRequestError, match="n"):
        ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], params={"n": 0})


def test_result_record_round_trip():
    r = ChatResult(status="ok", choices=[{"role": "assistant", "content": "hi"}], finish_reasons=["stop"],
                   usage=Usage(10, 4, 0, 3), latency_s=0.5, attempts=2, http_statuses=[503, 200], raw="{}",
                   request_hash="h", provider="openai", model="m")
    assert ChatResult.from_record(json.loads(json.dumps(r.to_record()))) == r


# ---- pure: OpenAI wire format -----------------------------------------------------------------------------
def test_prompt_template_response_formats_reach_the_wire_as_valid_schemas():
    """The prompt templates give OpenAI's json_schema wrapper; it must not be wrapped twice (vLLM answered
    400 to that), and Anthropic's forced tool gets the schema inside it. The fake server refuses such bodies."""
    from fakes.llm_server import invalid_request

    from cso_lib.prompts import PRM

    wrapped = PRM.response_format()
    req = ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], response_format=wrapped)
    fmt = openai_body(req)["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == wrapped["json_schema"]["schema"]
    assert fmt["json_schema"]["schema"]["type"] == "object" and invalid_request(openai_body(req), False) is None
    body = anthropic_body(req)
    assert body["tools"][-1]["input_schema"] == wrapped["json_schema"]["schema"]
    assert invalid_request(body, True) is None
    double = {"type": "json_schema", "json_schema": {"name": "r", "schema": wrapped, "strict": True}}
    assert "not a JSON schema" in invalid_request({"response_format": double}, False)


def test_openai_body_and_response():
    req = ChatRequest(model="m", messages=TRAJ, tools=TOOLS, params={"n": 3, "temperature": 0.7, "seed": 1},
                      response_format=SCORE_SCHEMA, cache_key="traj-1")
    body = openai_body(req)
    assert body["n"] == 3 and body["seed"] == 1 and body["tools"] == TOOLS and body["prompt_cache_key"] == "traj-1"
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "response", "schema": SCORE_SCHEMA, "strict": True}}
    assert openai_body(ChatRequest(model="m", messages=TRAJ, response_format="json"))["response_format"] == {
        "type": "json_object"}
    assert "n" not in openai_body(ChatRequest(model="m", messages=TRAJ, params={"n": 1}))
    resp = {"choices": [{"index": 1, "message": {"role": "assistant", "content": "b"}, "finish_reason": "length"},
                        {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 64}}}
    res = parse_openai_response(resp, json.dumps(resp), n=2)
    assert [c["content"] for c in res.choices] == ["a", "b"] and res.finish_reasons == ["stop", "length"]
    assert res.usage == Usage(input_tokens=100, cached_input_tokens=64, output_tokens=7)
    with pytest.raises(LLMResponseError):
        parse_openai_response({"id": "x"}, "{}", n=1)


# ---- pure: Anthropic conversion, both ways ---------------------------------------------------------------
def test_openai_messages_to_anthropic():
    msgs = [*TRAJ,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": '{"query": "D"}'}},
                {"id": "c3", "type": "function", "function": {"name": "lookup", "arguments": "{broken"}}]},
            {"role": "tool", "tool_call_id": "c2", "content": "D: born 1950"},
            {"role": "tool", "tool_call_id": "c3", "content": "error: bad arguments"},
            {"role": "user", "content": [{"type": "text", "text": "Score the last action."},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    system, out = to_anthropic_messages(msgs)
    assert system == [{"type": "text", "text": "You are an agent."}]
    assert [m["role"] for m in out] == ["user", "assistant", "user", "assistant", "user"]
    assert out[1]["content"] == [{"type": "text", "text": "Searching."},
                                 {"type": "tool_use", "id": "c1", "name": "lookup", "input": {"query": "film"}}]
    assert out[2]["content"] == [{"type": "tool_result", "tool_use_id": "c1", "content": "film: directed by D"}]
    assert out[3]["content"][1]["input"] == {"_raw_arguments": "{broken"}  # a logged malformed call keeps its text
    last = out[4]["content"]  # two tool results and the user's text merged into one user turn, results first
    assert [b["type"] for b in last] == ["tool_result", "tool_result", "text", "image"]
    assert last[3]["source"] == {"type": "base64", "media_type": "image/png", "data": "AAAA"}
    assert "cache_control" not in json.dumps(out)


def test_anthropic_cache_control_marks_the_shared_prefix():
    system, out = to_anthropic_messages([*TRAJ, {"role": "user", "content": "Score it."}], cache_prefix=True)
    assert system[-1]["cache_control"] == {"type": "ephemeral"}
    assert out[-2]["content"][-1]["cache_control"] == {"type": "ephemeral"}  # end of the trajectory prefix
    assert "cache_control" not in json.dumps(out[-1])  # the variable part
    assert json.dumps(out).count("cache_control") == 1


def test_anthropic_body_tools_structured_output_and_params():
    req = ChatRequest(model="claude", messages=[*TRAJ, {"role": "user", "content": "Score it."}], tools=TOOLS,
                      params={"temperature": 0, "stop": "END", "seed": 3, "top_k": 5, "max_tokens": 300},
                      response_format=SCORE_SCHEMA, cache_key="t")
    body = anthropic_body(req)
    assert body["max_tokens"] == 300 and body["stop_sequences"] == ["END"] and "seed" not in body and body["top_k"] == 5
    assert body["tools"][0] == {"name": "lookup", "description": "Look an entity up.",
                                "input_schema": TOOLS[0]["function"]["parameters"]}
    assert body["tools"][1]["input_schema"] == SCORE_SCHEMA
    assert body["tool_choice"] == {"type": "tool", "name": body["tools"][1]["name"]}
    assert to_anthropic_tools(TOOLS) == [body["tools"][0]]
    wrapped = anthropic_body(ChatRequest(model="c", messages=TRAJ, response_format={"type": "array"}))
    assert wrapped["tools"][-1]["input_schema"]["properties"]["value"] == {"type": "array"}


def test_anthropic_response_to_openai():
    body = {"content": [{"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"query": "D"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100,
                      "cache_creation_input_tokens": 20}}
    msg, finish, usage = from_anthropic_message(body)
    assert msg == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": '{"query": "D"}'}}]}
    assert finish == "tool_calls"
    assert usage == Usage(input_tokens=130, cached_input_tokens=100, cache_write_tokens=20, output_tokens=5)
    forced = {"content": [{"type": "tool_use", "id": "t", "name": "structured_output_value", "input": {"value": [1, 2]}}],
              "stop_reason": "tool_use", "usage": {}}
    msg, finish, _ = from_anthropic_message(forced)
    assert msg == {"role": "assistant", "content": "[1, 2]"} and finish == "stop"


# ---- pure: limits, headers, cost --------------------------------------------------------------------------
def test_rate_limit_header_parsing():
    assert parse_duration("6m0s") == 360 and parse_duration("1s") == 1 and parse_duration("1h2m3.5s") == 3723.5
    assert parse_duration("20ms") == pytest.approx(0.02) and parse_duration("later") is None
    assert parse_reset("2030-01-01T00:00:10Z", now=1893456000.0) == pytest.approx(10.0)
    assert parse_reset("0.5s") == 0.5
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "2"}) == 1.5
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "soon"}) is None


def test_limiter_aimd_cuts_once_per_epoch_and_creeps_back_never_above_the_limit():
    lim = AdaptiveLimiter(RateLimits(requests_per_minute=60000, period_s=0.2), share=0.5, increase_every_s=0.0)
    assert lim.requests_per_s() == pytest.approx(60000 * 0.5 * 0.98 / 0.2)

    async def go():
        return [await lim.acquire() for _ in range(3)]

    t1, t2, t3 = asyncio.run(go())
    lim.on_rate_limited(t1, None)
    lim.on_rate_limited(t2, None)  # sent before the cut: no second cut
    assert lim.multiplier == pytest.approx(0.7)
    t4 = asyncio.run(go())[0]
    lim.on_rate_limited(t4, None)
    assert lim.multiplier == pytest.approx(0.49)
    lim.on_success(t3, 0, 0)
    assert lim.multiplier == pytest.approx(0.49)  # no increase before a whole period without a 429
    time.sleep(0.25)
    for _ in range(100):
        lim.on_success(t3, 0, 0)
    assert lim.multiplier == 1.0
    lim.on_success(t3, 0, 0, {"x-ratelimit-limit-requests": "3000"})  # the provider's limit is lower: learn it
    assert lim.requests_per_s() == pytest.approx(3000 * 0.5 * 0.98 / 0.2)


def test_limiter_cuts_to_the_rate_it_was_answered_at():
    lim = AdaptiveLimiter(RateLimits(requests_per_minute=100, period_s=1.0), headroom=0.0)
    now = time.monotonic()
    for k in range(50):  # 50 answered in the last period while paced at 100 / period
        lim.on_success(Ticket(now - 0.5 + k * 0.01, lim._epoch, 0, 0, 1), 0, 0)
    lim.on_rate_limited(Ticket(now, lim._epoch, 0, 0, 1), retry_after=None)
    assert lim.multiplier == pytest.approx(0.7)  # 0.5 measured, but never cut more than `decrease`
    lim = AdaptiveLimiter(RateLimits(requests_per_minute=100, period_s=1.0), headroom=0.0)
    for k in range(80):
        lim.on_success(Ticket(now - 0.9 + k * 0.01, lim._epoch, 0, 0, 1), 0, 0)
    lim.on_rate_limited(Ticket(now, lim._epoch, 0, 0, 1), retry_after=None)
    assert lim.multiplier == pytest.approx(0.8)


def test_limiter_paces_requests_and_tokens():
    lim = AdaptiveLimiter(RateLimits(requests_per_minute=60, input_tokens_per_minute=600, period_s=1.0),
                          headroom=0.0, burst_s=0.1)

    async def go():
        start = time.monotonic()
        tickets = [await lim.acquire(input_tokens=20) for _ in range(7)]
        return time.monotonic() - start, tickets

    elapsed, tickets = asyncio.run(go())
    # 60 requests/s would allow 7 in 0.1 s; 600 tokens/s at 20 tokens each allow 30/s: ~0.2 s after the burst
    assert 0.12 < elapsed < 1.0
    lim.on_success(tickets[-1], input_tokens=800, output_tokens=0)  # far more than estimated: debt
    start = time.monotonic()
    asyncio.run(lim.acquire(input_tokens=1))
    assert time.monotonic() - start > 0.9  # ~780 tokens of debt at 600 tokens/s


def test_cost_usd():
    table = {"gpt": {"input": 2.0, "cached_input": 0.5, "output": 8.0},
             "claude": {"input": 3.0, "cached_input": 0.3, "output": 15.0}}
    u = Usage(input_tokens=1_000_000, cached_input_tokens=400_000, output_tokens=10_000)
    assert cost_usd("gpt", u, table) == pytest.approx(0.6 * 2 + 0.4 * 0.5 + 0.01 * 8)
    assert cost_usd("gpt", u, table, batch=True) == pytest.approx(cost_usd("gpt", u, table) / 2)
    w = Usage(input_tokens=1_000_000, cached_input_tokens=500_000, cache_write_tokens=100_000, output_tokens=0)
    assert cost_usd("claude", w, table) == pytest.approx(0.4 * 3 + 0.5 * 0.3 + 0.1 * 3.75)
    assert cost_usd("gpt", Usage(), table) == 0.0
    with pytest.raises(ConfigError, match="'nope'"):
        cost_usd("nope", u, table)
    with pytest.raises(ConfigError, match="output"):
        cost_usd("x", u, {"x": {"input": 1.0}})


def test_key_is_read_from_the_environment_and_kept_out_of_repr_and_pickles(monkeypatch):
    monkeypatch.setenv("CSO_TEST_KEY", "sk-secret-abc123")
    c = OpenAICompatClient("http://127.0.0.1:1/v1", "CSO_TEST_KEY")
    assert "sk-secret" not in repr(c) and b"sk-secret" not in pickle.dumps(c)
    assert pickle.loads(pickle.dumps(c)).auth_headers() == {"Authorization": "Bearer sk-secret-abc123"}
    monkeypatch.delenv("CSO_TEST_KEY")
    with pytest.raises(ConfigError, match="CSO_TEST_KEY"):
        AnthropicClient("http://127.0.0.1:1", "CSO_TEST_KEY")


# ---- against the loopback server --------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path):
    started: list[FakeLLMServer] = []

    def start(**kw) -> FakeLLMServer:
        srv = FakeLLMServer(log_path=str(tmp_path / f"log{len(started)}.jsonl"), **kw).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def _log(srv: FakeLLMServer) -> list[dict]:
    return [json.loads(line) for line in Path(srv.log_path).read_text().splitlines()]


@pytest.mark.slow
def test_openai_round_trip_tools_structured_n_and_cache(server):
    srv = server()
    client = OpenAICompatClient(srv.url + "/v1", None)
    prefix = [*TRAJ, {"role": "user", "content": "next"}]
    reqs = [
        ChatRequest(model="policy", messages=TRAJ[:2], tools=TOOLS),
        ChatRequest(model="judge", messages=[{"role": "system", "content": "Rate the action; give a score."}, *TRAJ[1:]],
                    response_format=SCORE_SCHEMA),
        ChatRequest(model="expert", messages=[{"role": "system", "content": "Propose 4 alternatives as JSON."},
                                              *TRAJ[1:]], params={"n": 3, "temperature": 1.0}),
        ChatRequest(model="judge", messages=[*prefix, {"role": "user", "content": "a"}], cache_key="traj-1"),
        ChatRequest(model="judge", messages=[*prefix, {"role": "user", "content": "b"}], cache_key="traj-1"),
    ]
    res = run_all_sync(reqs, client, None, concurrency=1)
    assert all(r.ok and r.attempts == 1 and r.http_statuses == [200] for r in res)
    call = res[0].choices[0]["tool_calls"][0]
    assert call["function"]["name"] == "lookup" and json.loads(call["function"]["arguments"])["query"]
    assert res[0].finish_reasons == ["tool_calls"]
    assert 0 <= json.loads(res[1].text)["score"] <= 1
    assert len(res[2].choices) == 3 and all(len(json.loads(c["content"])["alternatives"]) == 4 for c in res[2].choices)
    assert res[3].usage.cached_input_tokens == 0 and res[4].usage.cached_input_tokens > 0
    assert res[0].request_hash == reqs[0].hash("openai") and res[0].provider == "openai"
    assert json.loads(res[0].raw)["choices"]


@pytest.mark.slow
def test_azure_style_deployment_url_and_api_key_header(server, monkeypatch):
    monkeypatch.setenv("CSO_AZURE_KEY", "azure-secret-1")
    srv = server(api_key="azure-secret-1")
    client = OpenAICompatClient(srv.url + "/openai/deployments/gpt4o", "CSO_AZURE_KEY", azure_api_version="2024-10-21")
    (res,) = run_all_sync([ChatRequest(model="gpt4o", messages=TRAJ[:2])], client, None)
    assert res.ok and res.text.startswith("echo:")


@pytest.mark.slow
def test_anthropic_round_trip_tools_structured_n_and_cache(server):
    srv = server()
    client = AnthropicClient(srv.url, None)
    reqs = [
        ChatRequest(model="claude", messages=TRAJ[:2], tools=TOOLS),
        ChatRequest(model="claude", messages=TRAJ, tools=TOOLS),  # last is a tool result: answers in text
        ChatRequest(model="claude", messages=[{"role": "system", "content": "Give a score."}, *TRAJ[1:],
                                              {"role": "user", "content": "Score it."}],
                    response_format=SCORE_SCHEMA, params={"n": 2}, cache_key="traj-1"),
        ChatRequest(model="claude", messages=[{"role": "system", "content": "List 2 alternatives."}, *TRAJ[1:]],
                    response_format={"type": "array"}),
    ]
    res = run_all_sync(reqs, client, None, concurrency=1)
    assert all(r.ok for r in res), [r.error for r in res]
    call = res[0].choices[0]["tool_calls"][0]
    assert call["type"] == "function" and json.loads(call["function"]["arguments"])["query"]
    assert res[1].text.startswith("echo: film: directed by D") and "tool_calls" not in res[1].choices[0]
    assert len(res[2].choices) == 2 and all(0 <= json.loads(c["content"])["score"] <= 1 for c in res[2].choices)
    assert res[2].http_statuses == [200, 200] and res[2].finish_reasons == ["stop", "stop"]
    u = res[2].usage  # the first call wrote the prefix to the cache, the second read it
    assert u.cache_write_tokens > 0 and u.cached_input_tokens == u.cache_write_tokens
    assert json.loads(res[2].raw)[1]["usage"]["cache_read_input_tokens"] > 0
    assert isinstance(json.loads(res[3].text), dict)  # a non-object schema: the wrapped value comes back


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_faults_at_20_percent_give_the_fault_free_results_with_bounded_sends(server, provider):
    def client_for(srv):
        return OpenAICompatClient(srv.url + "/v1", None) if provider == "openai" else AnthropicClient(srv.url, None)

    reqs = [prm_request(i) for i in range(100)]
    clean = server()
    expected = run_all_sync(reqs, client_for(clean), None, concurrency=16)
    faulty = server(fault_rate=0.2, seed=3, timeout_sleep_s=1.0, fault_retry_after_s=0.05)
    arrived: list[int] = []
    max_attempts = 6
    start = time.monotonic()
    got = run_all_sync(reqs, client_for(faulty), AdaptiveLimiter(RateLimits()), concurrency=16,
                       max_attempts=max_attempts, call_timeout_s=0.4, deadline_s=30, backoff_base_s=0.02,
                       backoff_max_s=0.2, on_result=lambda i, r: arrived.append(i))
    assert time.monotonic() - start < 20
    assert sorted(arrived) == list(range(100))
    assert all(r.ok for r in got), [r.error for r in got if not r.ok]
    assert [r.choices for r in got] == [r.choices for r in expected]
    log = _log(faulty)
    outcomes = {e["outcome"] for e in log}
    assert {"429", "500", "503", "timeout", "malformed", "truncated"} <= outcomes
    sends: dict[str, int] = {}
    for e in log:
        sends[e["hash"]] = sends.get(e["hash"], 0) + 1
    assert len(sends) == 100 and max(sends.values()) <= max_attempts
    assert sum(r.attempts for r in got) == len(log)
    assert any(r.attempts > 1 for r in got)


@pytest.mark.slow
@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(server, status):
    srv = server()
    (res,) = run_all_sync([ChatRequest(model=f"status-{status}", messages=TRAJ[:2])],
                          OpenAICompatClient(srv.url + "/v1", None), None, max_attempts=5)
    assert res.status == "error" and res.attempts == 1 and res.http_statuses == [status]
    assert f"HTTP {status}" in res.error and "LLMRequestError" in res.error
    assert len(_log(srv)) == 1


@pytest.mark.slow
def test_deadline_and_timeout_bound_a_hanging_call(server):
    srv = server(fault_rate=1.0, faults=("timeout",), timeout_sleep_s=3.0)
    start = time.monotonic()
    (res,) = run_all_sync([prm_request(0)], OpenAICompatClient(srv.url + "/v1", None), None, max_attempts=10,
                          call_timeout_s=0.3, deadline_s=0.8, backoff_base_s=0.01, backoff_max_s=0.05)
    assert time.monotonic() - start < 1.5
    assert res.status == "error" and "LLMTimeoutError" in res.error and 2 <= res.attempts <= 3


@pytest.mark.slow
def test_retry_after_is_honoured(server):
    srv = server(rpm=1, window_s=1.0)
    reqs = [prm_request(0), prm_request(1)]
    res = run_all_sync(reqs, OpenAICompatClient(srv.url + "/v1", None), AdaptiveLimiter(RateLimits()),
                       concurrency=2, backoff_base_s=0.01, backoff_max_s=0.05)
    assert all(r.ok for r in res)
    limited = [r for r in res if 429 in r.http_statuses]
    assert len(limited) == 1 and limited[0].http_statuses[-1] == 200
    log = _log(srv)
    first_429 = min(e["t"] for e in log if e["outcome"] == "429-limit")
    first_ok = min(e["t"] for e in log if e["outcome"] == "ok")
    retried_ok = max(e["t"] for e in log if e["outcome"] == "ok")
    # Retry-After said: when the first admitted request leaves the 1 s window; nothing was sent before that
    assert retried_ok - first_ok >= 0.95
    assert all(not (first_429 < e["t"] < first_ok + 0.95) for e in log if e["outcome"] != "429-limit")
    assert sum(e["outcome"] == "429-limit" for e in log) <= 2


@pytest.mark.slow
@pytest.mark.parametrize("headers", [True, False], ids=["with-limit-headers", "aimd-only"])
def test_adaptive_limiter_configured_at_twice_the_real_limit_converges(server, headers):
    srv = server(rpm=20, window_s=1.0, rate_headers=headers)  # the real limit: 20 requests / s
    limiter = AdaptiveLimiter(RateLimits(requests_per_minute=40, period_s=1.0), seed=0)  # configured at 2x
    n = 80
    start = time.monotonic()
    res = run_all_sync([prm_request(i) for i in range(n)], OpenAICompatClient(srv.url + "/v1", None), limiter,
                       concurrency=8, max_attempts=8, backoff_base_s=0.05, backoff_max_s=0.5)
    elapsed = time.monotonic() - start
    assert all(r.ok for r in res)
    log = _log(srv)
    n429 = sum(e["outcome"] == "429-limit" for e in log)
    late = log[len(log) // 2:]
    late_share = sum(e["outcome"] == "429-limit" for e in late) / len(late)
    print(f"headers={headers} elapsed={elapsed:.2f}s sends={len(log)} 429s={n429} late_share={late_share:.3f} "
          f"stats={limiter.stats()}")
    assert n / elapsed >= 0.7 * 20  # near the real limit ...
    assert n429 / len(log) <= (0.05 if headers else 0.15)  # ... with few 429s
    assert late_share <= (0.02 if headers else 0.1)  # and fewer still once adapted


@pytest.mark.slow
def test_openai_batch_submit_poll_resume_and_partial(server):
    srv = server(batch_expire_rate=0.25, batch_error_rate=0.1, seed=1)
    items = [(prm_request(i).hash("openai"), prm_request(i)) for i in range(20)]
    items.append(("bad", ChatRequest(model="status-400", messages=TRAJ[:2])))
    batch_id = asyncio.run(OpenAIBatchClient(srv.url + "/v1", None).submit(items))
    status = asyncio.run(OpenAIBatchClient(srv.url + "/v1", None).status(batch_id))
    assert status.status == "in_progress" and not status.done
    # "restart": a new client resumes polling the stored id; nothing is submitted again
    outcome = asyncio.run(OpenAIBatchClient(srv.url + "/v1", None).wait(batch_id, poll_interval_s=0.01, timeout_s=5))
    assert outcome.status == "expired"
    assert sum(e["path"] == "/v1/batches" for e in _log(srv)) == 1
    ids = {cid for cid, _ in items}
    assert set(outcome.results) | set(outcome.resubmit) == ids and not set(outcome.results) & set(outcome.resubmit)
    assert outcome.results["bad"].status == "error" and "HTTP 400" in outcome.results["bad"].error
    ok = {cid: r for cid, r in outcome.results.items() if r.ok}
    assert 8 <= len(ok) <= 18 and all(r.batch for r in ok.values())
    direct = run_all_sync([req for cid, req in items if cid in ok], OpenAICompatClient(srv.url + "/v1", None), None)
    assert [r.choices for r in direct] == [ok[cid].choices for cid, _ in items if cid in ok]
    # resubmission of what is left completes it (this server expires by custom_id, so use fresh ones)
    clean = server()
    again = [(cid[:60] + "-r1", req) for cid, req in items if cid in outcome.resubmit]
    done = asyncio.run(OpenAIBatchClient(clean.url + "/v1", None).wait(
        asyncio.run(OpenAIBatchClient(clean.url + "/v1", None).submit(again)), poll_interval_s=0.01, timeout_s=5))
    assert done.status == "completed" and not done.resubmit and all(r.ok for r in done.results.values())


@pytest.mark.slow
def test_openai_batch_rejected_at_validation_raises(server):
    srv = server()
    client = OpenAIBatchClient(srv.url + "/v1", None)

    async def submit_bad_line() -> str:  # a line whose url does not match the endpoint
        async with client:
            line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}})
            resp = await client.send("POST", "/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", line)})
            body = {"input_file_id": resp.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
            return (await client.send("POST", "/batches", json=body)).json()["id"]

    batch_id = asyncio.run(submit_bad_line())
    with pytest.raises(LLMBatchError, match="failed.*invalid_url"):
        asyncio.run(client.wait(batch_id, poll_interval_s=0.01, timeout_s=5))


@pytest.mark.slow
def test_anthropic_batch_submit_poll_resume_and_partial(server):
    srv = server(batch_expire_rate=0.2, batch_error_rate=0.1, seed=2, batch_polls=3)
    items = [(f"req-{i}", prm_request(i)) for i in range(20)]
    items.append(("bad", ChatRequest(model="status-400", messages=TRAJ[:2])))
    batch_id = asyncio.run(AnthropicBatchClient(srv.url, None).submit(items))
    assert not asyncio.run(AnthropicBatchClient(srv.url, None).status(batch_id)).done
    outcome = asyncio.run(AnthropicBatchClient(srv.url, None).wait(batch_id, poll_interval_s=0.01, timeout_s=5))
    assert outcome.status == "ended"
    assert sum(e["path"] == "/v1/messages/batches" for e in _log(srv)) == 1
    assert set(outcome.results) | set(outcome.resubmit) == {cid for cid, _ in items}
    assert outcome.results["bad"].status == "error" and "invalid_request_error" in outcome.results["bad"].error
    ok = [r for r in outcome.results.values() if r.ok]
    assert ok and len(outcome.resubmit) >= 2 and all(r.batch and json.loads(r.text)["score"] >= 0 for r in ok)
    with pytest.raises(LLMRequestError, match="n=1"):
        asyncio.run(AnthropicBatchClient(srv.url, None).submit(
            [("x", ChatRequest(model="c", messages=TRAJ[:2], params={"n": 2}))]))


@pytest.mark.slow
def test_api_key_never_in_errors_logs_or_results(server, monkeypatch, caplog):
    secret = "sk-live-SECRET-9f8e7d"
    monkeypatch.setenv("CSO_KEY", secret)
    monkeypatch.setenv("CSO_WRONG_KEY", secret + "-wrong")
    caplog.set_level(logging.DEBUG)
    srv = server(api_key=secret)
    good = run_all_sync([prm_request(0)], OpenAICompatClient(srv.url + "/v1", "CSO_KEY"), None)
    ant = run_all_sync([prm_request(0)], AnthropicClient(srv.url, "CSO_KEY"), None)
    assert good[0].ok and ant[0].ok
    # a wrong key: the server echoes the key it got in its 401 body, as real providers partly do
    bad = run_all_sync([prm_request(1)], OpenAICompatClient(srv.url + "/v1", "CSO_WRONG_KEY"), None)
    assert bad[0].status == "error" and "401" in bad[0].error and "***" in bad[0].error

    async def direct():
        async with OpenAICompatClient(srv.url + "/v1", "CSO_WRONG_KEY") as c:
            await c.chat(prm_request(2))

    with pytest.raises(LLMRequestError) as exc:
        asyncio.run(direct())
    batch = OpenAIBatchClient(srv.url + "/v1", "CSO_KEY")
    outcome = asyncio.run(batch.wait(asyncio.run(batch.submit([("a", prm_request(3))])), poll_interval_s=0.01))
    texts = [str(exc.value), repr(exc.value), caplog.text, Path(srv.log_path).read_text(),
             *(json.dumps(r.to_record()) for r in [*good, *ant, *bad, *outcome.results.values()])]
    assert caplog.text  # httpx did log its requests
    assert not [t for t in texts if secret in t]


@pytest.mark.slow
def test_on_result_streams_results_and_its_errors_stop_the_run(server):
    srv = server()
    client = OpenAICompatClient(srv.url + "/v1", None)
    seen: list[tuple[int, float]] = []

    async def record(i, r):
        seen.append((i, time.monotonic()))

    res = asyncio.run(run_all([prm_request(i) for i in range(10)], client, None, concurrency=3, on_result=record))
    assert sorted(i for i, _ in seen) == list(range(10)) and len(res) == 10

    def boom(i, r):
        raise RuntimeError("ledger write failed")

    with pytest.raises(RuntimeError, match="ledger write failed"):
        run_all_sync([prm_request(i) for i in range(5)], client, None, on_result=boom)


@pytest.mark.slow
def test_server_runs_as_a_subprocess(tmp_path):
    log = tmp_path / "srv.jsonl"
    script = Path(__file__).parent / "fakes" / "llm_server.py"
    proc = subprocess.Popen([sys.executable, str(script), "--port", "0", "--rpm", "100", "--window-s", "2",
                             "--fault-rate", "0", "--seed", "1", "--log", str(log)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY ")
        url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        (res,) = run_all_sync([prm_request(0)], OpenAICompatClient(url, None), None)
        assert res.ok
        assert json.loads(log.read_text().splitlines()[0])["outcome"] == "ok"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_batch_wait_gives_up_at_its_timeout_and_polling_resumes_later(server):
    srv = server(batch_polls=1000)
    client = AnthropicBatchClient(srv.url, None)
    batch_id = asyncio.run(client.submit([("a", prm_request(0))]))
    with pytest.raises(LLMBatchError, match="still 'in_progress'"):
        asyncio.run(client.wait(batch_id, poll_interval_s=0.05, timeout_s=0.2))
    srv.batch_polls = 0  # the provider finishes; a later job polls the same id
    outcome = asyncio.run(AnthropicBatchClient(srv.url, None).wait(batch_id, poll_interval_s=0.01, timeout_s=5))
    assert outcome.results["a"].ok and not outcome.resubmit
