"""Raw log records -> canonical trajectories: read, parse, validate and convert one record (pure Python).

Three formats are recognised per record, so one file may mix them:

- `native`: the fields of schemas/trajectory.schema.json with `steps` (an assistant action + observation text);
- `messages`: the same fields with `messages`, an OpenAI chat message list with tool calls;
- `tau-bench`: `{task_id, trial, reward, info, traj}` (sierra-research/tau-bench historical trajectories).
  trajectory_id is `tau-bench-airline/<task_id>/<trial>`, query the first user message, ground_truth the JSON
  of `info.task.actions` (the reference action sequence; tau-bench grades by database state, not an answer
  string), metadata `{"trial", "info"}`, policy gpt-4o / tau-bench-historical, env tau-bench-airline.

A malformed record raises RecordError whose message names the field (`steps[3].action.tool_calls[0]...`);
the stage puts it in quarantine and goes on. `preamble`, `action`, `observations`, `tools` and `metadata`
become compact JSON text, an action's keys in a canonical order (role, content, tool_calls, then the rest as
given; in a tool call id, type, function, then the rest; in its function name, arguments, then the rest);
`content_hash` is the SHA-256 of the canonical content, so the same record re-ingested (from any file, in any
format that maps to the same content) has the same hash.

The ingest stage (and `ingest_one`) first tries `fast_native`: native-format records made only of the
schema's fields, with text content and ground truth, are decoded and type-checked by msgspec (C) into typed
structs and serialised by it, about twice as fast as the general path. Whatever it does not vouch for
(another format, an extra key anywhere, another type, a failed check) goes through `convert`, which is the
authority: the fast path gives the very same Trajectory, byte for byte, or nothing.

>>> rec = {"trajectory_id": "t1", "task_id": "k", "query": "2+2?", "outcome": 0, "policy_model": "m",
...        "policy_version": "v", "steps": [{"action": {"content": "5"}, "observation": None}]}
>>> t = convert(rec, default_env="sim")
>>> (t.input_format, t.n_steps, t.env, t.preamble, t.steps[0].action)
('native', 1, 'sim', '[{"role":"user","content":"2+2?"}]', '{"role":"assistant","content":"5"}')
>>> convert({**rec, "outcome": 2}, default_env="sim")
Traceback (most recent call last):
...
cso_lib.errors.RecordError: outcome must be 0 or 1, got 2
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import msgspec
import orjson
from msgspec import UNSET, Raw, Struct, UnsetType

from cso_lib.errors import RecordError
from cso_lib.messages import Message, first_tool, native_step, split_messages

RAW_HEAD_BYTES = 4096
ROLES = ("system", "user", "assistant", "tool")
TAU_BENCH_ENV = "tau-bench-airline"
TAU_BENCH_POLICY = ("gpt-4o", "tau-bench-historical")
_MISSING = object()


class StepRow(NamedTuple):
    """One step as stored: the action and observations as JSON text, and the first tool called."""

    action: str
    observations: str
    action_tool: str | None


@dataclass(frozen=True, slots=True)
class Trajectory:
    """One accepted record, in the columns of the `trajectories` table (plus its steps)."""

    trajectory_id: str
    task_id: str
    query: str
    ground_truth: str | None
    outcome: int
    reward: float | None
    policy_model: str
    policy_version: str
    env: str
    round: int
    tools: str | None
    preamble: str
    steps: list[StepRow]
    input_format: str
    content_hash: str
    metadata: str | None

    @property
    def n_steps(self) -> int:
        return len(self.steps)


class RawLine(NamedTuple):
    """A JSONL record as read: byte offset, 1-based line number (None when unknown), bytes, full size.

    `data` is the whole line, or only its first RAW_HEAD_BYTES when `size` exceeds the reader's limit.
    """

    offset: int
    line: int | None
    data: bytes
    size: int


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def raw_head(data: bytes) -> str:
    """The first 4 KiB of a record as text, for the quarantine table.

    >>> raw_head(b'{"a": 1}')
    '{"a": 1}'
    """
    return data[:RAW_HEAD_BYTES].decode("utf-8", errors="replace")


def iter_jsonl(f: BinaryIO, start: int, end: int, max_record_bytes: int) -> Iterator[RawLine]:
    """The non-blank lines that START in [start, end) of a seekable file, like Hadoop's LineRecordReader.

    A split that does not start at 0 skips the partial line it begins in (the previous split reads it to its
    end), and the last line is read past `end`. So splits at any byte boundaries yield every line exactly
    once. Line numbers are known only in a split that starts at 0. A line longer than `max_record_bytes`
    is not held in memory: its first 4 KiB and its size come back.

    >>> import io
    >>> buf = io.BytesIO(b'{"a":1}\\n\\n{"b":2}\\n{"c":3}')
    >>> [(r.offset, r.line, r.data) for r in iter_jsonl(buf, 0, 9, 1024)]
    [(0, 1, b'{"a":1}')]
    >>> [(r.offset, r.line, r.data) for r in iter_jsonl(buf, 9, 99, 1024)]
    [(9, None, b'{"b":2}'), (17, None, b'{"c":3}')]
    """
    next_line: int | None = 1 if start == 0 else None
    pos = start
    f.seek(max(start - 1, 0))
    if start > 0:  # skip the rest of the line that byte start - 1 is in, without holding it in memory
        pos, tail = start - 1, b""
        while not tail.endswith(b"\n"):
            tail = f.readline(1 << 20)
            pos += len(tail)
            if not tail:
                return
    while pos < end:
        data = f.readline(max_record_bytes + 1)
        if not data:
            return
        offset, size = pos, len(data)
        oversized = size > max_record_bytes and not data.endswith(b"\n")
        if oversized:
            head, tail = data[:RAW_HEAD_BYTES], data
            while tail and not tail.endswith(b"\n"):
                tail = f.readline(1 << 20)
                size += len(tail)
            data = head
        pos += size
        line = next_line
        if next_line is not None:
            next_line += 1
        record = data.rstrip(b"\r\n")
        if record.strip():
            yield RawLine(offset, line, record, size if oversized else len(record))


def load(data: bytes, size: int, max_record_bytes: int) -> Any:
    """Parse one raw record; RecordError when it is too large or not JSON.

    >>> load(b'[1', 2, 1024)
    Traceback (most recent call last):
    ...
    cso_lib.errors.RecordError: invalid JSON: unexpected end of data: line 1 column 3 (char 2)
    """
    if size > max_record_bytes:
        raise RecordError(f"record is {size} bytes, over ingest.max_record_bytes={max_record_bytes}")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise RecordError(f"invalid JSON: {e}") from e


def record_id(record: Any) -> str | None:
    """The record's trajectory id when it has a usable one (for the quarantine table), else None."""
    if not isinstance(record, dict):
        return None
    tid = record.get("trajectory_id")
    if isinstance(tid, str) and tid:
        return tid
    if (
        "traj" in record
        and isinstance(record.get("task_id"), int | str)
        and isinstance(record.get("trial"), int)
    ):
        return f"{TAU_BENCH_ENV}/{record['task_id']}/{record['trial']}"
    return None


def _text(rec: dict, key: str, where: str = "") -> str:
    value = rec.get(key, _MISSING)
    if value is _MISSING or value is None:
        raise RecordError(f"{where}{key} is missing")
    if not isinstance(value, str):
        raise RecordError(f"{where}{key} must be a string, got {type(value).__name__} {_show(value)}")
    if not value.strip():
        raise RecordError(f"{where}{key} is empty")
    return value


def _reward(value: Any, key: str = "reward") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise RecordError(f"{key} must be a number in [0, 1], got {_show(value)}")
    return float(value)


def _outcome(rec: dict) -> tuple[int, float | None]:
    return _outcome_of(rec.get("outcome"), rec.get("reward"))


def _outcome_of(outcome: Any, reward: Any) -> tuple[int, float | None]:
    reward = _reward(reward)
    if outcome is None:
        if reward is None:
            raise RecordError("outcome is missing and there is no reward to derive it from")
        return (1 if reward >= 1 else 0), reward
    if isinstance(outcome, bool) or outcome not in (0, 1) or not isinstance(outcome, int):
        raise RecordError(f"outcome must be 0 or 1, got {_show(outcome)}")
    return outcome, reward


def _tool_calls(msg: dict, where: str) -> list[str]:
    """Validate an assistant message's tool calls; their ids."""
    calls = msg.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise RecordError(f"{where}.tool_calls must be a list, got {type(calls).__name__}")
    ids = []
    for i, call in enumerate(calls):
        w = f"{where}.tool_calls[{i}]"
        if not isinstance(call, dict):
            raise RecordError(f"{w} must be an object, got {_show(call)}")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise RecordError(f"{w}.id is missing or not a non-empty string")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise RecordError(f"{w}.function is missing")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise RecordError(f"{w}.function.name is missing or not a non-empty string")
        args = fn.get("arguments")
        if not isinstance(args, str):
            raise RecordError(f"{w}.function.arguments must be a JSON object as text, got {_show(args)}")
        try:
            parsed = orjson.loads(args)
        except orjson.JSONDecodeError as e:
            raise RecordError(f"{w}.function.arguments is not valid JSON: {e}") from e
        if not isinstance(parsed, dict):
            raise RecordError(f"{w}.function.arguments is not a JSON object: {_show(args)}")
        ids.append(call_id)
    return ids


def _assistant(msg: dict, where: str) -> list[str]:
    """Validate an assistant message (an action); its tool call ids."""
    content = msg.get("content")
    if content is not None and not isinstance(content, str | list):
        raise RecordError(f"{where}.content must be text, a list of parts or null, got {_show(content)}")
    ids = _tool_calls(msg, where)
    if not content and not ids:
        raise RecordError(f"{where} has neither content nor tool_calls")
    return ids


def _messages(msgs: Any, where: str) -> list[Message]:
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(f"{where} must be a non-empty list of messages, got {_show(msgs)}")
    call_ids: set[str] = set()
    n_actions = 0
    for i, msg in enumerate(msgs):
        w = f"{where}[{i}]"
        if not isinstance(msg, dict):
            raise RecordError(f"{w} must be an object, got {_show(msg)}")
        role = msg.get("role")
        if role not in ROLES:
            raise RecordError(f"{w}.role must be one of {', '.join(ROLES)}; got {_show(role)}")
        content = msg.get("content")
        if content is not None and not isinstance(content, str | list):
            raise RecordError(f"{w}.content must be text, a list of parts or null, got {_show(content)}")
        if role == "assistant":
            call_ids.update(_assistant(msg, w))
            n_actions += 1
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in call_ids:
                raise RecordError(f"{w}.tool_call_id {_show(call_id)} matches no earlier tool call")
    if not n_actions:
        raise RecordError(f"{where} has no assistant message")
    return msgs


def _native_steps(steps: Any) -> list[tuple[Message, list[Message]]]:
    if not isinstance(steps, list) or not steps:
        raise RecordError(f"steps must be a non-empty list, got {_show(steps)}")
    out = []
    for i, step in enumerate(steps):
        w = f"steps[{i}]"
        if not isinstance(step, dict):
            raise RecordError(f"{w} must be an object, got {_show(step)}")
        action = step.get("action")
        if action is None:
            raise RecordError(f"{w}.action is missing")
        if not isinstance(action, dict):
            raise RecordError(f"{w}.action must be an assistant message object, got {_show(action)}")
        if action.get("role", "assistant") != "assistant":
            raise RecordError(f"{w}.action.role must be 'assistant', got {_show(action.get('role'))}")
        _assistant(action, f"{w}.action")
        observation = step.get("observation")
        if observation is not None and not isinstance(observation, str):
            raise RecordError(f"{w}.observation must be text or null, got {_show(observation)}")
        out.append(native_step(action, observation))
    return out


def _tools(tools: Any) -> str | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RecordError(f"tools must be a list of tool specs or null, got {_show(tools)}")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError(f"tools[{i}].function.name is missing")
    return _dumps(tools)


def _ground_truth(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | list):
        raise RecordError(f"ground_truth must be a string, number, list or null, got {_show(value)}")
    return _dumps(value)


def _optional(rec: dict, key: str, kind: type, default: Any) -> Any:
    value = rec.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RecordError(f"{key} must be {kind.__name__} or absent, got {_show(value)}")
    return value


def content_hash(header: list[Any], steps: list[StepRow]) -> str:
    """SHA-256 of the header fields as JSON and each step's JSON, joined by U+001E.

    JSON text never holds a raw U+001E (control characters are escaped), so the join is unambiguous.
    """
    parts = [orjson.dumps(header).decode(), *(s for row in steps for s in row[:2])]
    return hashlib.sha256("\x1e".join(parts).encode()).hexdigest()


def _orders(keys: tuple[str, ...]) -> frozenset[tuple[str, ...]]:
    """Every key tuple that lists some of `keys` in their order and nothing else."""
    return frozenset(tuple(k for i, k in enumerate(keys) if mask >> i & 1) for mask in range(1 << len(keys)))


_ACTION_KEYS, _CALL_KEYS, _FUNCTION_KEYS = ("role", "content", "tool_calls"), ("id", "type", "function"), ("name", "arguments")
_CANONICAL = {keys: _orders(keys) for keys in (_ACTION_KEYS, _CALL_KEYS, _FUNCTION_KEYS)}


def _ordered(value: Any, first: tuple[str, ...]) -> Any:
    """An object with the keys of `first` that it has first, in that order, then the others as given."""
    if not isinstance(value, dict) or tuple(value) in _CANONICAL[first]:
        return value
    out = {k: value[k] for k in first if k in value}
    out.update((k, v) for k, v in value.items() if k not in out)
    return out


def _canonical_call(call: Any) -> Any:
    call = _ordered(call, _CALL_KEYS)
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        fn = _ordered(call["function"], _FUNCTION_KEYS)
        if fn is not call["function"]:
            call = {**call, "function": fn}
    return call


def canonical_action(action: Message) -> Message:
    """An assistant message with its keys in the canonical order (role, content, tool_calls, the rest as given;
    tool calls: id, type, function; functions: name, arguments), so that the same action logged with its keys
    in another order gives the same text and hash. The message itself when it is canonical (the usual case).

    >>> canonical_action({"tool_calls": [{"function": {"arguments": "{}", "name": "f"}, "id": "c"}], "role": "assistant"})
    {'role': 'assistant', 'tool_calls': [{'id': 'c', 'function': {'name': 'f', 'arguments': '{}'}}]}
    """
    action = _ordered(action, _ACTION_KEYS)
    calls = action.get("tool_calls")
    if type(calls) is list:
        for c in calls:  # the common case only looks: every call and function is in order already
            if (
                type(c) is not dict
                or tuple(c) not in _CANONICAL[_CALL_KEYS]
                or (type(f := c.get("function")) is dict and tuple(f) not in _CANONICAL[_FUNCTION_KEYS])
            ):
                return {**action, "tool_calls": [_canonical_call(c) for c in calls]}  # the caller's stays as is
    return action


def _finish(fields: dict[str, Any], pre: str, rows: list[StepRow], input_format: str) -> Trajectory:
    header = [*fields.values(), pre]
    return Trajectory(
        **fields, preamble=pre, steps=rows, input_format=input_format, content_hash=content_hash(header, rows)
    )


def _build(
    fields: dict[str, Any],
    preamble: list[Message],
    steps: list[tuple[Message, list[Message]]],
    input_format: str,
) -> Trajectory:
    rows = [StepRow(_dumps(canonical_action(action)), _dumps(obs), first_tool(action)) for action, obs in steps]
    return _finish(fields, _dumps(preamble), rows, input_format)


def _tau_bench(rec: dict) -> Trajectory:
    task_id = rec.get("task_id")
    if isinstance(task_id, bool) or not isinstance(task_id, int | str) or task_id == "":
        raise RecordError(f"task_id must be an integer or a non-empty string, got {_show(task_id)}")
    trial = rec.get("trial")
    if isinstance(trial, bool) or not isinstance(trial, int):
        raise RecordError(f"trial must be an integer, got {_show(trial)}")
    reward = _reward(rec.get("reward"))
    if reward is None:
        raise RecordError("reward is missing (tau-bench records carry reward, not outcome)")
    traj = _messages(rec.get("traj"), "traj")
    query = next((m.get("content") for m in traj if m["role"] == "user"), None)
    if not isinstance(query, str) or not query:
        raise RecordError("traj has no user message with text content (the query)")
    info = rec.get("info")
    if info is not None and not isinstance(info, dict):
        raise RecordError(f"info must be an object or absent, got {_show(info)}")
    task = (info or {}).get("task")
    actions = task.get("actions") if isinstance(task, dict) else None
    preamble, steps = split_messages(traj)
    fields = {
        "trajectory_id": f"{TAU_BENCH_ENV}/{task_id}/{trial}",
        "task_id": str(task_id),
        "query": query,
        "ground_truth": None if actions is None else _dumps(actions),
        "outcome": 1 if reward >= 1 else 0,
        "reward": reward,
        "policy_model": TAU_BENCH_POLICY[0],
        "policy_version": TAU_BENCH_POLICY[1],
        "env": TAU_BENCH_ENV,
        "round": 0,
        "tools": None,
        "metadata": _dumps({"trial": trial, "info": info}),
    }
    return _build(fields, preamble, steps, "tau-bench")


def convert(record: Any, default_env: str) -> Trajectory:
    """Validate one parsed record and convert it to the canonical trajectory; RecordError names the field."""
    if not isinstance(record, dict):
        raise RecordError(f"record must be a JSON object, got {type(record).__name__} {_show(record)}")
    has_steps, has_messages = "steps" in record, "messages" in record
    if not has_steps and not has_messages and "traj" in record and "trajectory_id" not in record:
        return _tau_bench(record)
    tid = record.get("trajectory_id", _MISSING)
    if tid is _MISSING or tid is None:
        raise RecordError("trajectory_id is missing")
    if not isinstance(tid, str) or not tid.strip() or len(tid) > 512:
        raise RecordError(
            f"trajectory_id must be a non-empty string of at most 512 characters, got {_show(tid)}"
        )
    if has_steps and has_messages:
        raise RecordError("record has both steps and messages; give exactly one")
    if not has_steps and not has_messages:
        raise RecordError("record has neither steps nor messages")
    query = _text(record, "query")
    system_prompt = record.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise RecordError(f"system_prompt must be text or null, got {_show(system_prompt)}")
    metadata = record.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise RecordError(f"metadata must be an object or absent, got {_show(metadata)}")
    outcome, reward = _outcome(record)
    fields = {
        "trajectory_id": tid,
        "task_id": _text(record, "task_id"),
        "query": query,
        "ground_truth": _ground_truth(record.get("ground_truth")),
        "outcome": outcome,
        "reward": reward,
        "policy_model": _text(record, "policy_model"),
        "policy_version": _text(record, "policy_version"),
        "env": _text(record, "env") if record.get("env") is not None else default_env,
        "round": _optional(record, "round", int, 0),
        "tools": _tools(record.get("tools")),
        "metadata": None if metadata is None else _dumps(metadata),
    }
    if fields["round"] < 0:
        raise RecordError(f"round must be >= 0, got {fields['round']}")
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    if has_steps:
        steps = _native_steps(record["steps"])
        return _build(fields, [*system, {"role": "user", "content": query}], steps, "native")
    preamble, steps = split_messages(_messages(record["messages"], "messages"))
    if system and not any(m["role"] == "system" for m in preamble):
        preamble = [*system, *preamble]
    if not any(m["role"] == "user" for m in preamble):
        preamble = [*preamble, {"role": "user", "content": query}]
    return _build(fields, preamble, steps, "messages")


class _Function(Struct, forbid_unknown_fields=True):
    name: str
    arguments: str


class _ToolCall(Struct, forbid_unknown_fields=True):
    id: str
    type: str | UnsetType = UNSET
    function: _Function | UnsetType = UNSET


class _Action(Struct, forbid_unknown_fields=True):
    role: str | UnsetType = UNSET
    content: str | None | UnsetType = UNSET
    tool_calls: list[_ToolCall] | None | UnsetType = UNSET


class _Step(Struct, forbid_unknown_fields=True):
    action: _Action
    observation: str | None = None


class _Native(Struct, forbid_unknown_fields=True):
    """A native-format record whose every field has the type the fast path handles (a subset of convert's)."""

    trajectory_id: str
    task_id: str
    query: str
    policy_model: str
    policy_version: str
    steps: list[_Step]
    ground_truth: str | None = None
    outcome: int | None = None
    reward: float | None = None
    env: str | None = None
    round: int | None = None
    system_prompt: str | None = None
    tools: Raw | UnsetType = UNSET
    metadata: Raw | UnsetType = UNSET


_NATIVE = msgspec.json.Decoder(_Native)
_ENCODE = msgspec.json.Encoder().encode  # the same bytes as orjson for text (not for floats: none reach it)
_TOOLS_TEXT: dict[bytes, str | None] = {}  # raw `tools` -> its text: logs repeat the same tool specs


def _raw_tools(raw: Raw | UnsetType) -> str | None:
    if raw is UNSET:
        return None
    key = bytes(raw)
    text = _TOOLS_TEXT.get(key, UNSET)
    if text is UNSET:
        if len(_TOOLS_TEXT) >= 256:
            _TOOLS_TEXT.clear()
        text = _TOOLS_TEXT[key] = _tools(orjson.loads(key))
    return text


def _nonblank(value: str) -> bool:
    return bool(value.strip())


def fast_native(data: bytes, default_env: str) -> Trajectory | None:
    """The Trajectory of a plain native-format record (see the module docstring), or None: then `convert`
    decides, and says what is wrong. Never a different result from `convert(orjson.loads(data))`."""
    try:
        r = _NATIVE.decode(data)
        metadata = None if r.metadata is UNSET else orjson.loads(bytes(r.metadata))
        tid = r.trajectory_id
        if (
            not r.steps
            or not _nonblank(tid)
            or len(tid) > 512
            or not (_nonblank(r.task_id) and _nonblank(r.query))
            or not (_nonblank(r.policy_model) and _nonblank(r.policy_version))
            or (r.env is not None and not _nonblank(r.env))
            or (metadata is not None and type(metadata) is not dict)
            or (r.round is not None and r.round < 0)
        ):
            return None
        outcome, reward = _outcome_of(r.outcome, r.reward)
        fields = {
            "trajectory_id": tid,
            "task_id": r.task_id,
            "query": r.query,
            "ground_truth": r.ground_truth,
            "outcome": outcome,
            "reward": reward,
            "policy_model": r.policy_model,
            "policy_version": r.policy_version,
            "env": default_env if r.env is None else r.env,
            "round": 0 if r.round is None else r.round,
            "tools": _raw_tools(r.tools),
            "metadata": None if metadata is None else _dumps(metadata),
        }
        rows = []
        for step in r.steps:
            action = step.action
            if action.role is not UNSET and action.role != "assistant":
                return None
            action.role = "assistant"
            calls = action.tool_calls
            if calls:
                for c in calls:
                    if (
                        not c.id
                        or c.function is UNSET
                        or not c.function.name
                        or type(orjson.loads(c.function.arguments)) is not dict
                    ):
                        return None
            elif not action.content:
                return None
            obs = step.observation
            if obs is None:
                observations = "[]"
            elif calls:
                observations = f'[{{"role":"tool","tool_call_id":{_ENCODE(calls[0].id).decode()},"content":{_ENCODE(obs).decode()}}}]'
            else:
                observations = f'[{{"role":"user","content":{_ENCODE(obs).decode()}}}]'
            rows.append(StepRow(_ENCODE(action).decode(), observations, calls[0].function.name if calls else None))
    except (msgspec.DecodeError, orjson.JSONDecodeError, RecordError):
        return None
    system = [{"role": "system", "content": r.system_prompt}] if r.system_prompt is not None else []
    return _finish(fields, _dumps([*system, {"role": "user", "content": r.query}]), rows, "native")


def ingest_one(data: bytes, size: int, max_record_bytes: int, default_env: str) -> Trajectory:
    """Parse and convert one raw record (a JSONL line or a serialised array element)."""
    if size <= max_record_bytes:
        fast = fast_native(data, default_env)
        if fast is not None:
            return fast
    return convert(load(data, size, max_record_bytes), default_env)
