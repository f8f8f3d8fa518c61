"""Pure conversions of the verified pairs and branch rollouts into trainers' formats.

- `llamafactory_record`: one TRL conversational pair -> LLaMA-Factory's sharegpt *ranking* record
  (`conversations` of {from, value} turns, `chosen` / `rejected` single turns, `system`, `tools`), following
  hiyouga/LLaMA-Factory data/README.md: human / observation turns at odd positions, gpt / function_call at
  even ones, an odd number of turns for a preference record, function calls as JSON {"name", "arguments"}
  (a list for parallel calls).
- `stepwise_records`: TRL's stepwise-supervision format (standard: `prompt` text, `completions` one text per
  step, `labels` one bool per step) from a verified critical step, with Math-Shepherd's hard estimate: a step
  is good when some rollout through it reaches the ground truth.
- `wilson_interval`: the 95% Wilson score interval of a success rate.

>>> call = {"id": "c0", "type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}}
>>> pair = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
...         "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}],
...         "rejected": [{"role": "assistant", "content": "no idea"}], "tools": "[]"}
>>> rec, notes = llamafactory_record(pair)
>>> rec["system"], rec["conversations"], rec["chosen"]["from"], json.loads(rec["chosen"]["value"])
('S', [{'from': 'human', 'value': 'Q'}], 'function_call', {'name': 'search', 'arguments': {'q': 'x'}})
>>> rec["rejected"], notes
({'from': 'gpt', 'value': 'no idea'}, [])
>>> [round(x, 3) for x in wilson_interval(8, 10)]
[0.49, 0.943]
"""

from __future__ import annotations

import json
import math
from typing import Any

from cso_lib.errors import ExportError
from cso_lib.messages import Message, split_messages

HUMAN, GPT, OBSERVATION, FUNCTION = "human", "gpt", "observation", "function_call"
ODD, EVEN = (HUMAN, OBSERVATION), (GPT, FUNCTION)


def _arguments(raw: Any, where: str) -> Any:
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ExportError(f"{where}.function.arguments is not valid JSON: {raw[:80]!r}") from e


def _turn(msg: Message, where: str, notes: list[str]) -> dict[str, str]:
    """One OpenAI message as a sharegpt turn."""
    role = msg.get("role")
    if role == "assistant":
        calls = msg.get("tool_calls") or []
        if not calls:
            return {"from": GPT, "value": msg.get("content") or ""}
        if msg.get("content"):
            notes.append("assistant_text_dropped")  # a function_call turn holds the calls only
        fns = [{"name": (c.get("function") or {}).get("name"),
                "arguments": _arguments((c.get("function") or {}).get("arguments"), f"{where}.tool_calls[{i}]")}
               for i, c in enumerate(calls)]
        return {"from": FUNCTION, "value": json.dumps(fns[0] if len(fns) == 1 else fns, ensure_ascii=False)}
    if role == "tool":
        return {"from": OBSERVATION, "value": msg.get("content") or ""}
    if role == "user":
        return {"from": HUMAN, "value": msg.get("content") or ""}
    raise ExportError(f"{where}.role={role!r} has no sharegpt turn (system prompts are only allowed first)")


def llamafactory_record(pair: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(sharegpt ranking record, notes) for one dpo_pairs row. Notes name lossy conversions.

    Consecutive tool results (parallel calls) become one observation turn; a user turn right after an
    observation is folded into it, so turns keep alternating as LLaMA-Factory requires.
    """
    prompt = list(pair["prompt"])
    notes: list[str] = []
    system = ""
    if prompt and prompt[0].get("role") == "system":
        system = prompt[0].get("content") or ""
        prompt = prompt[1:]
    turns: list[dict[str, str]] = []
    for i, msg in enumerate(prompt):
        turn = _turn(msg, f"prompt[{i}]", notes)
        if turns and turns[-1]["from"] in ODD and turn["from"] in ODD:
            turns[-1]["value"] += "\n" + turn["value"]
            notes.append("odd_turns_merged")
            continue
        if turns and turns[-1]["from"] in EVEN and turn["from"] in EVEN:
            raise ExportError(f"prompt[{i}]: two assistant turns in a row cannot alternate in sharegpt")
        turns.append(turn)
    if not turns or turns[0]["from"] != HUMAN:
        raise ExportError("prompt: the first non-system message must be a user message")
    if turns[-1]["from"] not in ODD:
        raise ExportError("prompt: must end with a user or tool message (the state the action answers)")
    out = {"conversations": turns, "system": system, "tools": pair.get("tools") or ""}
    for side in ("chosen", "rejected"):
        msgs = pair[side]
        if len(msgs) != 1:
            raise ExportError(f"{side}: expected one assistant message, got {len(msgs)}")
        out[side] = _turn(msgs[0], f"{side}[0]", notes)
        if out[side]["from"] not in EVEN:
            raise ExportError(f"{side}[0].role={msgs[0].get('role')!r}: must be an assistant message")
    return out, sorted(set(notes))


def llamafactory_dataset_info(name: str, file_name: str) -> dict[str, Any]:
    """The dataset_info.json entry of a sharegpt ranking file with system and tools columns."""
    return {name: {
        "file_name": file_name,
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": "system",
                    "tools": "tools"},
    }}


# ---- step-level supervision ---------------------------------------------------------------------------
def render_action(action: Message) -> str:
    """An assistant action as plain text: its text, then one `name(arguments)` line per tool call."""
    parts = [action["content"]] if action.get("content") else []
    for c in action.get("tool_calls") or []:
        fn = c.get("function") or {}
        args = fn.get("arguments")
        parts.append(f"{fn.get('name')}({args if isinstance(args, str) else json.dumps(args)})")
    return "\n".join(parts)


def render_step(action: Message, observations: list[Message]) -> str:
    """One step as text: the action, then each observation prefixed with its role."""
    lines = [render_action(action)]
    lines += [f"[{m.get('role')}] {m.get('content') or ''}" for m in observations]
    return "\n".join(lines)


def render_preamble(preamble: list[Message]) -> str:
    return "\n\n".join(f"[{m.get('role')}] {m.get('content') or ''}" for m in preamble)


def stepwise_records(prompt: list[Message], rejected: Message, chosen: Message,
                     continuation: list[Message] | None) -> list[dict[str, Any]]:
    """Two stepwise-supervision examples of one verified critical step t.

    - the logged path: steps 0..t-1 (True: the verified branch from s_t reached the answer, so each earlier
      step has a successful completion) and the policy's action a_t (False: its logged continuation failed);
    - the verified path: steps 0..t-1, the chosen action and the successful rollout's later steps, all True.
    The last completion of each example is the action itself (its observation is not known for a_t's
    rejection and not needed).
    """
    preamble, steps = split_messages(prompt)
    head = [render_step(a, obs) for a, obs in steps]
    base = render_preamble(preamble)
    rejected_ex = {"prompt": base, "completions": head + [render_action(rejected)],
                   "labels": [True] * len(head) + [False], "path": "logged"}
    tail: list[str] = []
    if continuation:
        _, cont = split_messages(continuation)
        tail = [render_step(a, obs) for a, obs in cont]
    if not tail:
        tail = [render_action(chosen)]
    chosen_ex = {"prompt": base, "completions": head + tail, "labels": [True] * (len(head) + len(tail)),
                 "path": "verified"}
    return [rejected_ex, chosen_ex]


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of successes / n; (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact ends at 0 and n successes (the formula gives them only up to rounding)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi
