"""Trajectories as OpenAI chat messages: splitting into steps, rebuilding the state s_t, final answers.

A step is one assistant message (the action) plus the messages that answered it (tool results, user
turns) up to the next assistant message. The state s_t = preamble + actions and observations of steps
0..t-1: exactly the messages the policy had when it chose action t.

>>> msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
...         {"role": "assistant", "content": None, "tool_calls": [call("c0", "lookup", {"x": 1})]},
...         {"role": "tool", "tool_call_id": "c0", "content": "42"},
...         {"role": "assistant", "content": "done"}]
>>> pre, steps = split_messages(msgs)
>>> [m["role"] for m in pre], len(steps), [m["role"] for m in state_at(pre, steps, 1)]
(['system', 'user'], 2, ['system', 'user', 'assistant', 'tool'])
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

Message = dict[str, Any]
Step = tuple[Message, list[Message]]  # (action, observations)

FINAL_ANSWER_TOOL = "final_answer"


def call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI tool call."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def assistant(content: str | None, tool_calls: list[dict[str, Any]] | None = None) -> Message:
    msg: Message = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


def split_messages(messages: list[Message]) -> tuple[list[Message], list[Step]]:
    """Preamble (everything before the first assistant message) and the steps."""
    preamble: list[Message] = []
    steps: list[Step] = []
    for msg in messages:
        if msg.get("role") == "assistant":
            steps.append((msg, []))
        elif steps:
            steps[-1][1].append(msg)
        else:
            preamble.append(msg)
    return preamble, steps


def native_step(action: Message, observation: str | None) -> Step:
    """A native-format step (assistant message + observation text) as (action, observations)."""
    action = {"role": "assistant", **{k: v for k, v in action.items() if k != "role"}}
    if observation is None:
        return action, []
    calls = action.get("tool_calls") or []
    if calls:
        return action, [{"role": "tool", "tool_call_id": calls[0].get("id"), "content": observation}]
    return action, [{"role": "user", "content": observation}]


def iter_states(preamble: list[Message], steps: list[Step]) -> Iterator[tuple[int, list[Message]]]:
    """(t, s_t) for every step, built incrementally: linear in trajectory length, one shared list.

    The yielded list is extended in place after each step; copy it if it must outlive the iteration.
    """
    state = list(preamble)
    for t, (action, observations) in enumerate(steps):
        yield t, state
        state.append(action)
        state.extend(observations)


def state_at(preamble: list[Message], steps: list[Step], t: int) -> list[Message]:
    state = list(preamble)
    for action, observations in steps[:t]:
        state.append(action)
        state.extend(observations)
    return state


def tool_calls(action: Message) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """(name, parsed arguments or None if not JSON, call id) per tool call of an assistant message."""
    out = []
    for c in action.get("tool_calls") or []:
        fn = c.get("function") or {}
        raw = fn.get("arguments")
        try:
            args = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            args = None
        out.append((fn.get("name"), args if isinstance(args, dict) else None, c.get("id")))
    return out


def signature(action: Message) -> str:
    """What an action does, ignoring its prose and call ids: tool names and parsed arguments.

    >>> a = assistant("x", [call("c1", "f", {"b": 1, "a": 2})])
    >>> signature(a) == signature(assistant("other words", [call("c9", "f", {"a": 2, "b": 1})]))
    True
    """
    if action.get("tool_calls"):
        return json.dumps([(n, a) for n, a, _ in tool_calls(action)], sort_keys=True)
    return json.dumps(["text", (action.get("content") or "").strip()])


def first_tool(action: Message) -> str | None:
    calls = action.get("tool_calls") or []
    return (calls[0].get("function") or {}).get("name") if calls else None


def final_answer(action: Message) -> str | None:
    """The answer given by an action: a `final_answer` tool call, or None if the action is not an answer."""
    for name, args, _ in tool_calls(action):
        if name == FINAL_ANSWER_TOOL and args is not None and "answer" in args:
            return str(args["answer"])
    return None


def to_struct(msg: Message) -> Message:
    """A message in the fixed Parquet struct (schemas.tables.MESSAGE): content as text, args as JSON text."""
    content = msg.get("content")
    if content is not None and not isinstance(content, str):
        content = json.dumps(content)
    calls = None
    if msg.get("tool_calls"):
        calls = []
        for c in msg["tool_calls"]:
            fn = c.get("function") or {}
            args = fn.get("arguments")
            calls.append(
                {
                    "id": c.get("id"),
                    "type": c.get("type", "function"),
                    "function": {
                        "name": fn.get("name"),
                        "arguments": args if isinstance(args, str) or args is None else json.dumps(args),
                    },
                }
            )
    return {
        "role": msg["role"],
        "content": content,
        "tool_calls": calls,
        "tool_call_id": msg.get("tool_call_id"),
        "name": msg.get("name"),
    }
