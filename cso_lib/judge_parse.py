"""Strict parsers of the expert's, the PRM's and the taxonomy judge's answers (prompts in cso_lib.prompts).

A provider-backed PRM calls `parse_prm` on each answer's text; a ParseError means "retry, then record
the request as unscored" (models.Score(score=None, status="unscored")). Nothing here ever returns a
default score.

Accepted answer forms, in order:
1. the whole answer is one JSON object (what structured output returns);
2. otherwise, JSON objects in ``` / ```json fences that hold the answer key;
3. PRM / taxonomy only, otherwise: a final line `Score: 0.73` / `Category: reasoning` (optionally bold,
   optionally "Final score"), the reasoning being the text before it.
Anything else is a ParseError. Deliberate decisions:
- Scores must lie in [0, 1]: 1.5, -0.2, 7 (a 0-10 scale) are errors, never clipped or rescaled.
- NaN / Infinity (which Python's json accepts), booleans, null, lists and words are errors.
- A score given as a string is accepted only when the string is a plain decimal ("0.7", " 1 ");
  "70%", "0.7/1", "high" are errors. Such strings are unambiguous and common from open models.
- Extra keys in the JSON object are ignored: only `score` (or `category`, `alternatives`) is the answer.
  A key given twice in one object ({"score": 1.0, "score": 0.3}) is an error, not "last one wins".
- Every place the answer states a score must agree: fenced JSON objects, and lines that consist only of
  "Score: x". Disagreement is an error (unscored beats a possibly injected score). A score mentioned
  inside a sentence, or inside the JSON `reasoning` string (e.g. the judged action's text saying
  "score: 1.0" quoted by the judge), is not an answer form and is ignored.

>>> parse_prm('{"reasoning": "valid call, right id", "score": 0.72}')
(0.72, 'valid call, right id')
>>> parse_prm("The call repeats step 2.\\nScore: 0.35")
(0.35, 'The call repeats step 2.')
>>> parse_taxonomy('{"reasoning": "wrong id", "category": "information_extraction"}')
('information_extraction', 'wrong id')
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from cso_lib.errors import ParseError
from cso_lib.messages import Message, assistant, signature
from cso_lib.prompts import CATEGORIES

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)```", re.S)
_DECIMAL = re.compile(r"^\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*$")
_FINAL_LINE = r"^\s*(?:\*\*|__)?\s*(?:final\s+)?{key}\s*(?:\*\*|__)?\s*[:=]\s*(?:\*\*|__)?\s*(?P<v>.*?)\s*(?:\*\*|__)?\s*$"
_SCORE_LINE = re.compile(_FINAL_LINE.format(key="score"), re.I)
_CATEGORY_LINE = re.compile(_FINAL_LINE.format(key="(?:error\\s+)?category"), re.I)


def _no_constants(name: str) -> Any:
    raise ParseError(f"non-finite number {name!r} in JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ParseError(f"key {key!r} appears twice in one JSON object")
        out[key] = value
    return out


def _loads(text: str) -> Any:
    """json.loads without NaN/Infinity and without silently dropping duplicate keys."""
    return json.loads(text, parse_constant=_no_constants, object_pairs_hook=_unique_keys)


def _whole_object(text: str) -> dict[str, Any] | None:
    """The answer if it is exactly one JSON object, else None (ParseError for NaN or duplicate keys)."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        value = _loads(stripped)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _fenced_objects(text: str, key: str) -> list[dict[str, Any]]:
    """JSON objects in code fences that hold `key` (fences quoting other JSON are ignored)."""
    out = []
    for body in _FENCE.findall(text):
        try:
            value = _loads(body.strip())
        except ValueError:
            continue
        if isinstance(value, dict) and key in value:
            out.append(value)
    return out


def _prose(text: str) -> str | None:
    """The answer's text outside code fences, or None if there is none."""
    rest = _FENCE.sub("", text).strip()
    return rest or None


def _reasoning(obj: dict[str, Any]) -> str | None:
    value = obj.get("reasoning")
    if value is not None and not isinstance(value, str):
        raise ParseError(f"reasoning must be a string, got {type(value).__name__} {value!r:.80}")
    return value


# ---- PRM -----------------------------------------------------------------------------------------------
def score_value(value: Any) -> float:
    """A PRM score as a float in [0, 1], or ParseError.

    >>> score_value(1), score_value("0.70")
    (1.0, 0.7)
    """
    if isinstance(value, bool) or value is None:
        raise ParseError(f"score must be a number, got {value!r}")
    if isinstance(value, str):
        if not _DECIMAL.match(value):
            raise ParseError(f"score must be a number, got the string {value!r:.80}")
        value = float(value)
    if not isinstance(value, int | float):
        raise ParseError(f"score must be a number, got {type(value).__name__} {value!r:.80}")
    value = float(value)
    if not math.isfinite(value):
        raise ParseError(f"score must be finite, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ParseError(f"score {value!r} is outside [0, 1]")
    return value


def _score_lines(text: str) -> list[str]:
    """The numbers stated by lines that are only a `Score: x` statement (other such lines are ignored)."""
    out = []
    for line in text.split("\n"):
        m = _SCORE_LINE.match(line)
        if m and _DECIMAL.match(m.group("v").rstrip(".")):
            out.append(m.group("v").rstrip("."))
    return out


def parse_prm(text: str | None) -> tuple[float, str | None]:
    """(score in [0, 1], reasoning) from a PRM answer, or ParseError. See the module docstring for the rules."""
    if text is None or not text.strip():
        raise ParseError("empty PRM answer")
    obj = _whole_object(text)
    if obj is not None:
        if "score" not in obj:
            raise ParseError(f"JSON answer has no 'score' key (keys: {sorted(obj)!r})")
        return score_value(obj["score"]), _reasoning(obj)
    fenced = _fenced_objects(text, "score")
    stated = {score_value(o["score"]) for o in fenced} | {score_value(v) for v in _score_lines(_FENCE.sub("", text))}
    if len(stated) > 1:
        raise ParseError(f"conflicting scores in one answer: {sorted(stated)!r}")
    if fenced:
        reasoning = _reasoning(fenced[-1])
        return stated.pop(), reasoning if reasoning is not None else _prose(text)
    body = text.strip().split("\n")
    last = _SCORE_LINE.match(body[-1])
    if last is not None:
        return score_value(last.group("v").rstrip(".")), "\n".join(body[:-1]).strip() or None
    if stated:
        raise ParseError("a 'Score:' line must be the answer's last line")
    raise ParseError(f"no JSON object, fenced JSON or final 'Score:' line in the answer: {text.strip()!r:.120}")


# ---- taxonomy ------------------------------------------------------------------------------------------
def category_value(value: Any) -> str:
    """One of CATEGORIES: case, spaces and hyphens normalised ("Tool invocation" -> tool_invocation)."""
    if not isinstance(value, str):
        raise ParseError(f"category must be a string, got {value!r:.80}")
    name = re.sub(r"[\s\-]+", "_", value.strip().strip("*`'\".").strip().lower())
    if name not in CATEGORIES:
        raise ParseError(f"category {value!r:.80} is not one of {CATEGORIES!r}")
    return name


def parse_taxonomy(text: str | None) -> tuple[str, str | None]:
    """(category, reasoning) from the taxonomy judge's answer, or ParseError."""
    if text is None or not text.strip():
        raise ParseError("empty taxonomy answer")
    obj = _whole_object(text)
    if obj is not None:
        if "category" not in obj:
            raise ParseError(f"JSON answer has no 'category' key (keys: {sorted(obj)!r})")
        return category_value(obj["category"]), _reasoning(obj)
    fenced = _fenced_objects(text, "category")
    if fenced:
        found = {category_value(o["category"]) for o in fenced}
        if len(found) > 1:
            raise ParseError(f"conflicting categories in one answer: {sorted(found)!r}")
        reasoning = _reasoning(fenced[-1])
        return found.pop(), reasoning if reasoning is not None else _prose(text)
    body = text.strip().split("\n")
    m = _CATEGORY_LINE.match(body[-1])
    if m is None:
        raise ParseError(f"no JSON object, fenced JSON or final 'Category:' line: {text.strip()!r:.120}")
    return category_value(m.group("v")), "\n".join(body[:-1]).strip() or None


# ---- expert ----------------------------------------------------------------------------------------
@dataclass
class ExpertParse:
    actions: list[Message]  # OpenAI assistant messages, arguments as JSON strings, deterministic call ids
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (index in the answer, why)


def _call_id(name: str, args_json: str, j: int) -> str:
    return "call_" + hashlib.sha256(f"{name}\x1f{args_json}\x1f{j}".encode()).hexdigest()[:20]


def _tool_params(tools: list[dict] | None) -> dict[str, dict | None] | None:
    if tools is None:
        return None
    out = {}
    for t in tools:
        fn = t.get("function") or t
        if isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters")
    return out


def _alternative(alt: Any, params: dict[str, dict | None] | None) -> Message:
    """One alternative as an assistant message, or ParseError with the reason it is malformed."""
    if not isinstance(alt, dict):
        raise ParseError(f"alternative is not an object: {alt!r:.80}")
    thought = alt.get("thought")
    if thought is not None and not isinstance(thought, str):
        raise ParseError(f"thought must be a string, got {type(thought).__name__}")
    raw_calls = alt.get("tool_calls", [])
    if raw_calls is None:
        raw_calls = []
    if not isinstance(raw_calls, list):
        raise ParseError(f"tool_calls must be a list, got {type(raw_calls).__name__}")
    calls = []
    for j, c in enumerate(raw_calls):
        if not isinstance(c, dict):
            raise ParseError(f"tool call {j} is not an object")
        fn = c["function"] if isinstance(c.get("function"), dict) else c  # the OpenAI shape is accepted too
        name, args = fn.get("name"), fn.get("arguments", {})
        if not isinstance(name, str) or not name.strip():
            raise ParseError(f"tool call {j} has no tool name")
        if isinstance(args, str):
            try:
                args = _loads(args) if args.strip() else {}
            except ValueError as e:
                raise ParseError(f"tool call {j} ({name}): arguments are not JSON: {e}") from e
        if not isinstance(args, dict):
            raise ParseError(f"tool call {j} ({name}): arguments must be an object, got {args!r:.80}")
        if params is not None:
            if name not in params:
                raise ParseError(f"tool call {j}: unknown tool {name!r} (tools: {sorted(params)!r})")
            schema = params[name]
            if isinstance(schema, dict):
                try:
                    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(args))
                except jsonschema.exceptions.SchemaError:
                    error = None  # the logged tool schema itself is broken: do not judge arguments by it
                if error is not None:
                    raise ParseError(f"tool call {j} ({name}): arguments do not match the tool: {error.message}")
        canonical = json.dumps(args, sort_keys=True)
        calls.append(
            {
                "id": _call_id(name, canonical, j),
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
    if not calls and not (thought or "").strip():
        raise ParseError("empty action: no tool call and no text")
    return assistant(thought if thought else None, calls or None)


def parse_expert(
    text: str | None, k: int | None = None, tools: list[dict] | None = None, policy_action: Message | None = None
) -> ExpertParse:
    """The expert's alternatives as OpenAI assistant messages, in the answer's order.

    Malformed alternatives (not an object, no tool name, arguments not an object or not valid for the tool,
    unknown tool when `tools` is known, empty) are dropped with the reason; so are duplicates (same tools
    and arguments, prose ignored: messages.signature), alternatives identical to `policy_action`, and
    any beyond the first k kept. ParseError only when the answer as a whole does not parse; an answer with
    no usable alternative returns an empty list (the caller decides whether to retry).

    >>> r = parse_expert('{"alternatives": [{"thought": "look", "tool_calls": [{"name": "f", "arguments": {"a": 1}}]},'
    ...                  ' {"thought": "again", "tool_calls": [{"name": "f", "arguments": "{\\\\"a\\\\": 1}"}]}]}')
    >>> [a["tool_calls"][0]["function"]["arguments"] for a in r.actions], r.dropped
    (['{"a": 1}'], [(1, 'duplicate of alternative 0')])
    """
    if text is None or not text.strip():
        raise ParseError("empty expert answer")
    obj = _whole_object(text)
    if obj is None:
        fenced = _fenced_objects(text, "alternatives")
        if len({json.dumps(o, sort_keys=True) for o in fenced}) > 1:
            raise ParseError(f"{len(fenced)} different fenced JSON answers")
        obj = fenced[0] if fenced else None
    if obj is None:
        raise ParseError(f"no JSON object with 'alternatives' in the expert answer: {text.strip()!r:.120}")
    alts = obj.get("alternatives")
    if not isinstance(alts, list):
        raise ParseError(f"'alternatives' must be a list, got {type(alts).__name__}")
    params = _tool_params(tools)
    out = ExpertParse([])
    seen = {signature(policy_action): "the policy's own action"} if policy_action is not None else {}
    for i, alt in enumerate(alts):
        try:
            action = _alternative(alt, params)
        except ParseError as e:
            out.dropped.append((i, str(e)))
            continue
        sig = signature(action)
        if sig in seen:
            out.dropped.append((i, f"duplicate of {seen[sig]}"))
        elif k is not None and len(out.actions) >= k:
            out.dropped.append((i, f"beyond k={k}"))
        else:
            seen[sig] = f"alternative {i}"
            out.actions.append(action)
    return out
