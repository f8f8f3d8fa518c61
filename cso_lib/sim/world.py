"""The simulation world: a seeded tool-use world whose ground truth is known. SIMULATION, not a real model.

Tasks are multi-hop look-ups over a generated knowledge base: find a person with `search`, follow a
stated chain of attributes with `lookup` (employer -> headquarters -> country -> currency ...), and call
`final_answer`. Every step after the search is a decision point where the scripted policy errs at a set
rate (wrong attribute, wrong entity, made-up id, premature answer, wrong value in the answer) or slips
(a malformed call it then retries). Because the world knows the solver's action at every state, it can
say whether an action is right, which is what lets a run measure the pipeline itself: are verified pairs
real fixes (precision), are the true critical steps found (recall).

Everything is a pure function of (seed, task, state, action): reruns give identical logs and scores.

>>> w = SimWorld(seed=1, n_tasks=5, n_entities=30)
>>> task = w.task("sim-1-0003")
>>> len(task.plan) >= 2 and w.answer_ok(task, task.answer)
True
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from cso_lib.messages import FINAL_ANSWER_TOOL, Message, assistant, call, tool_calls
from cso_lib.messages import signature as canonical

# type -> {attribute: target type, or None for a terminal value}
RELATIONS: dict[str, dict[str, str | None]] = {
    "person": {"employer": "company", "born_in": "city", "lives_in": "city", "birth_date": None},
    "company": {"headquarters": "city", "founder": "person", "founded_on": None, "ceo": "person"},
    "city": {"country": "country", "mayor": "person", "population": None, "twin_city": "city"},
    "country": {"capital": "city", "currency": None, "head_of_state": "person", "calling_code": None},
}
PREFIX = {"person": "P", "company": "C", "city": "T", "country": "N"}
SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "sol", "dra", "ti", "nor", "bel", "ash", "qui", "zen", "or", "ul"]
ERROR_CATEGORY = {
    "wrong_attribute": "reasoning",
    "skip_hop": "reasoning",
    "distractor_entity": "information_extraction",
    "made_up_entity": "information_extraction",
    "wrong_answer_value": "information_extraction",
    "premature_answer": "task_understanding",
    "slip": "tool_invocation",
    "give_up": "other",
    "carried_error": "other",  # right by the history, wrong because of an earlier mistake
}
# Simulated PRM: mean score per kind of action (the "truth"); Gaussian noise is added.
PRM_MEAN = {"correct": 0.8, "doomed": 0.6, "plausible": 0.5, "slip": 0.3, "obvious": 0.2}
PLAUSIBLE = {"distractor_entity", "skip_hop", "wrong_attribute"}

SYSTEM_PROMPT = (
    "You are a research agent. Answer the user's question by calling tools: `search` finds entities by "
    "name, `lookup` reads one attribute of an entity by id. Follow the chain the question describes, one "
    "lookup per step, and call `final_answer` with the value asked for."
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Find entities whose name matches the query.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Read one attribute of an entity.",
            "parameters": {
                "type": "object",
                "properties": {"entity_id": {"type": "string"}, "attribute": {"type": "string"}},
                "required": ["entity_id", "attribute"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": FINAL_ANSWER_TOOL,
            "description": "Give the final answer.",
            "parameters": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]},
        },
    },
]


def _rng(*parts: Any) -> random.Random:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def fingerprint(messages: list[Message]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]




@dataclass(frozen=True)
class Task:
    task_id: str
    person_id: str
    plan: tuple[str, ...]  # attributes to follow; the last one is asked for
    chain: tuple[str, ...]  # true entity ids/values: chain[0] = person, chain[i] = value after i lookups
    query: str

    @property
    def answer(self) -> str:
        return self.chain[-1]


@dataclass
class Belief:
    """What the policy believes after reading the history: hops done, current entity, search results."""

    searched: bool = False
    results: tuple[tuple[str, str], ...] = ()  # (id, name)
    hop: int = 0
    entity: str | None = None
    failed: bool = False  # a lookup came back with an error that is not a malformed call


class SimWorld:
    """Knowledge base, tasks, tools, and the ground truth of every action."""

    def __init__(self, seed: int = 7, n_tasks: int = 500, n_entities: int = 400, min_hops: int = 2,
                 max_hops: int = 4) -> None:
        self.seed, self.n_tasks, self.n_entities = seed, n_tasks, n_entities
        self.min_hops, self.max_hops = min_hops, max(min_hops, max_hops)
        self._tasks: dict[str, Task] = {}

    @classmethod
    def from_config(cls, sim) -> SimWorld:
        return cls(sim.seed, sim.n_tasks, sim.n_entities, sim.min_hops, sim.max_hops)

    # ---- knowledge base -------------------------------------------------------------------------
    @cached_property
    def kb(self) -> dict[str, dict[str, str]]:
        rng = _rng("kb", self.seed, self.n_entities)
        ids = {t: [f"{PREFIX[t]}{i:04d}" for i in range(self.n_entities)] for t in RELATIONS}
        # Each relation is a permutation of its target type: two entities never share a target through the
        # same attribute, so a wrong path cannot rejoin the right one and reach the true answer by chance.
        targets = {
            (etype, attr): rng.sample(ids[target], len(ids[target]))
            for etype, attrs in RELATIONS.items()
            for attr, target in attrs.items()
            if target
        }
        kb: dict[str, dict[str, str]] = {}
        for etype, attrs in RELATIONS.items():
            for i, eid in enumerate(ids[etype]):
                row = {"type": etype, "name": self._name(rng, etype)}
                for attr, target in attrs.items():
                    row[attr] = targets[etype, attr][i] if target else self._value(rng, attr)
                kb[eid] = row
        return kb

    @staticmethod
    def _name(rng: random.Random, etype: str) -> str:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if etype == "person":
            return f"{word} {''.join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()}"
        return {"company": f"{word} Corp", "city": f"{word}ville", "country": f"{word}ia"}[etype]

    @staticmethod
    def _value(rng: random.Random, attr: str) -> str:
        """Terminal values from large spaces, so two paths rarely end on the same value by chance."""
        if attr == "currency":
            return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))
        if attr == "population":
            return str(rng.randint(10_000, 9_000_000))
        if attr == "calling_code":
            return f"+{rng.randint(1, 999)}-{rng.randint(10, 99)}"
        return f"{rng.randint(1800, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"

    @cached_property
    def _by_name(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for eid, row in self.kb.items():
            out.setdefault(row["name"].lower(), []).append(eid)
        return out

    def _similar(self, eid: str, n: int) -> list[str]:
        """Other people whose names look like this one's (the search's distractors)."""
        rng = _rng("similar", self.seed, eid)
        surname = self.kb[eid]["name"].split()[-1]
        people = [e for e, r in self.kb.items() if r["type"] == "person" and e != eid]
        same = [e for e in people if self.kb[e]["name"].endswith(surname)]
        pool = same + rng.sample(people, min(len(people), 2 * n))
        return list(dict.fromkeys(pool))[:n]

    # ---- tasks ----------------------------------------------------------------------------------
    def task_ids(self) -> list[str]:
        return [f"sim-{self.seed}-{i:04d}" for i in range(self.n_tasks)]

    def task(self, task_id: str) -> Task:
        if task_id not in self._tasks:
            self._tasks[task_id] = self._make_task(task_id)
        return self._tasks[task_id]

    def _make_task(self, task_id: str) -> Task:
        rng = _rng("task", self.seed, task_id)
        people = [e for e, r in self.kb.items() if r["type"] == "person"]
        hops = rng.randint(self.min_hops, self.max_hops)
        while True:
            person = rng.choice(people)
            plan, chain, etype = [], [person], "person"
            for h in range(hops):
                last = h == hops - 1
                attrs = [a for a, t in RELATIONS[etype].items() if (t is None) == last and a not in plan]
                if not attrs:
                    break
                attr = rng.choice(attrs)
                plan.append(attr)
                chain.append(self.kb[chain[-1]][attr])
                etype = RELATIONS[etype][attr] or etype
            if len(plan) == hops:
                break
        name = self.kb[person]["name"]
        steps = ", then ".join(f"the {a.replace('_', ' ')}" for a in plan[:-1])
        query = (
            f"Start from the person named {name}. Look up {steps + ', then ' if steps else ''}the "
            f"{plan[-1].replace('_', ' ')} of the last entity. What is the {plan[-1].replace('_', ' ')}? "
            f"(Chain of attributes: {' -> '.join(plan)})"
        )
        return Task(task_id, person, tuple(plan), tuple(chain), query)

    def answer_ok(self, task: Task, answer: str | None) -> bool:
        return answer is not None and answer.strip().lower() == task.answer.lower()

    # ---- tools ----------------------------------------------------------------------------------
    def execute(self, action: Message) -> list[Message]:
        """Run an action's tool calls; one tool message per call. A final answer gets no observation."""
        out = []
        for name, args, call_id in tool_calls(action):
            if name == FINAL_ANSWER_TOOL:
                continue
            out.append({"role": "tool", "tool_call_id": call_id, "content": self._tool(name, args)})
        return out

    def _tool(self, name: str | None, args: dict | None) -> str:
        if args is None:
            return "Error: arguments are not a JSON object"
        if name == "search":
            q = str(args.get("query", "")).strip().lower()
            if not q:
                return "Error: search() missing required argument 'query'"
            hits = self._by_name.get(q, [])
            hits = hits + [e for h in hits for e in self._similar(h, 2)]
            if not hits:
                return "No results."
            return "\n".join(f"{e}: {self.kb[e]['name']} ({self.kb[e]['type']})" for e in dict.fromkeys(hits))
        if name == "lookup":
            for arg in ("entity_id", "attribute"):
                if not args.get(arg):
                    return f"Error: lookup() missing required argument '{arg}'"
            eid, attr = str(args["entity_id"]), str(args["attribute"])
            row = self.kb.get(eid)
            if row is None:
                return f"Error: no entity with id {eid!r}"
            if attr not in RELATIONS[row["type"]]:
                return f"Error: {row['type']} {eid} has no attribute {attr!r}"
            value = row[attr]
            label = f" ({self.kb[value]['name']})" if value in self.kb else ""
            return f"{eid}.{attr} = {value}{label}"
        return f"Error: unknown tool {name!r}"

    # ---- reading a history ----------------------------------------------------------------------
    def _pairs(self, state: list[Message]):
        """(tool name, args, observation text or None) for each tool call, matching each call with the
        next tool message carrying its id (agents do reuse ids across turns)."""
        pending: list[tuple] = []
        for msg in state:
            if msg.get("role") == "assistant":
                yield from ((name, args, None) for name, args, _ in pending)
                pending = list(tool_calls(msg))
            elif msg.get("role") == "tool":
                for i, (name, args, call_id) in enumerate(pending):
                    if call_id == msg.get("tool_call_id"):
                        del pending[i]
                        yield name, args, msg.get("content")
                        break
        yield from ((name, args, None) for name, args, _ in pending)

    def belief(self, task: Task, state: list[Message]) -> Belief:
        b = Belief()
        for name, args, obs in self._pairs(state):
            obs = obs or ""
            if name == "search" and not obs.startswith("Error"):
                b.searched = True
                b.results = tuple(
                    (line.split(":", 1)[0], line.split(": ", 1)[1].rsplit(" (", 1)[0])
                    for line in obs.splitlines()
                    if ": " in line
                )
            elif name == "lookup" and args is not None:
                if obs.startswith("Error: lookup() missing") or obs.startswith("Error: arguments"):
                    continue  # a malformed call: retried, nothing learnt
                if obs.startswith("Error"):
                    b.failed = True
                    continue
                if " = " not in obs:
                    continue
                value = obs.split(" = ", 1)[1].split(" (", 1)[0]
                b.failed = False
                attr = args.get("attribute")
                b.hop = (task.plan.index(attr) if attr in task.plan else b.hop) + 1
                b.entity = value
        return b

    def known_hops(self, task: Task, state: list[Message]) -> int:
        """How many hops of the TRUE chain the history has established (-1: not even searched)."""
        done = {(str(a.get("entity_id")), a.get("attribute")) for n, a, o in self._pairs(state)
                if n == "lookup" and a and o and not o.startswith("Error")}
        searched = any(n == "search" and o and task.person_id in o for n, a, o in self._pairs(state))
        if not searched:
            return -1
        m = 0
        while m < len(task.plan) and (task.chain[m], task.plan[m]) in done:
            m += 1
        return m

    def solver_action(self, task: Task, state: list[Message], call_id: str = "call_0") -> Message:
        m = self.known_hops(task, state)
        if m < 0:
            name = self.kb[task.person_id]["name"]
            return assistant(f"I will search for {name}.", [call(call_id, "search", {"query": name})])
        if m < len(task.plan):
            attr = task.plan[m]
            return assistant(
                f"Next I need the {attr} of {task.chain[m]}.",
                [call(call_id, "lookup", {"entity_id": task.chain[m], "attribute": attr})],
            )
        return assistant("I have the answer.", [call(call_id, FINAL_ANSWER_TOOL, {"answer": task.answer})])

    def is_correct(self, task: Task, state: list[Message], action: Message) -> bool:
        return canonical(action) == canonical(self.solver_action(task, state))

    # ---- the scripted policy and its errors -----------------------------------------------------
    def _variants(self, task: Task, state: list[Message], rng: random.Random, call_id: str):
        """Wrong actions at this state, as (kind, action), each fatal: it can only lead to a wrong answer."""
        b = self.belief(task, state)
        out: list[tuple[str, Message]] = []
        if not b.searched:
            return out
        hop = b.hop if b.entity is not None else 0
        entity = b.entity if b.entity is not None else self._pick(task, b)
        right = task.plan[hop] if hop < len(task.plan) else None
        if right is not None and entity in self.kb:
            etype = self.kb[entity]["type"]
            good = self.kb[entity].get(right)
            for attr in RELATIONS[etype]:
                if attr != right and self.kb[entity][attr] != good:
                    kind = "skip_hop" if attr in task.plan else "wrong_attribute"
                    out.append((kind, assistant(f"Next I need the {attr} of {entity}.",
                                                [call(call_id, "lookup", {"entity_id": entity, "attribute": attr})])))
            pool = [e for e, _ in b.results if e != entity] if hop == 0 else []
            others = [e for e, r in self.kb.items() if r["type"] == etype and e != entity]
            pool += rng.sample(others, min(3, len(others)))
            for other in dict.fromkeys(pool):
                if self.kb[other].get(right) != good:
                    kind = "distractor_entity" if hop == 0 else "made_up_entity"
                    out.append((kind, assistant(f"Next I need the {right} of {other}.",
                                                [call(call_id, "lookup", {"entity_id": other, "attribute": right})])))
            guess = self.kb[entity]["name"] if entity in self.kb else str(entity)
            out.append(("premature_answer", assistant("I think I know the answer already.",
                                                      [call(call_id, FINAL_ANSWER_TOOL, {"answer": guess})])))
        elif right is None:
            for value in dict.fromkeys(v for v in task.chain[:-1] if v != task.answer):
                shown = self.kb[value]["name"] if value in self.kb else value
                out.append(("wrong_answer_value", assistant("I have the answer.",
                                                            [call(call_id, FINAL_ANSWER_TOOL, {"answer": shown})])))
        rng.shuffle(out)
        return out

    def _pick(self, task: Task, b: Belief) -> str | None:
        """The policy reads the search results: the entity whose name is the one in the question."""
        name = self.kb[task.person_id]["name"]
        return next((e for e, n in b.results if n == name), b.results[0][0] if b.results else None)

    def policy_action(self, task: Task, state: list[Message], key: str, error_rate: float,
                      slip_rate: float) -> tuple[Message, str | None]:
        """The scripted policy's action at `state` and the kind of error it made (None: none).

        It follows its belief of the history (so it carries earlier errors forward), errs at a decision
        point with `error_rate`, and slips with a malformed call with `slip_rate`.
        """
        rng = _rng("policy", self.seed, key, fingerprint(state))
        call_id = f"call_{sum(m.get('role') == 'assistant' for m in state)}"
        b = self.belief(task, state)
        if not b.searched:
            name = self.kb[task.person_id]["name"]
            return assistant(f"I will search for {name}.", [call(call_id, "search", {"query": name})]), None
        if b.failed:
            guess = self.kb[b.entity]["name"] if b.entity in self.kb else str(b.entity or "unknown")
            return assistant("The lookup failed; I will answer with what I have.",
                             [call(call_id, FINAL_ANSWER_TOOL, {"answer": guess})]), "give_up"
        if rng.random() < slip_rate:
            return assistant("Looking this up.", [call(call_id, "lookup", {"entity_id": b.entity or ""})]), "slip"
        if rng.random() < error_rate:
            variants = self._variants(task, state, rng, call_id)
            if variants:
                kind, action = variants[0]
                return action, kind
        entity = b.entity if b.entity is not None else self._pick(task, b)
        if b.hop >= len(task.plan):
            shown = entity
            return assistant("I have the answer.", [call(call_id, FINAL_ANSWER_TOOL, {"answer": shown})]), None
        attr = task.plan[b.hop]
        return assistant(f"Next I need the {attr} of {entity}.",
                         [call(call_id, "lookup", {"entity_id": entity, "attribute": attr})]), None

    # ---- ground truth of an action, for the simulated PRM and for measuring the pipeline --------
    def action_kind(self, task: Task, state: list[Message], action: Message) -> str:
        """correct | doomed (consistent with an earlier mistake) | slip | plausible | obvious."""
        if self.is_correct(task, state, action):
            return "correct"
        calls = tool_calls(action)
        if calls and calls[0][0] == "lookup" and (calls[0][1] is None or not all(
                calls[0][1].get(a) for a in ("entity_id", "attribute"))):
            return "slip"
        b = self.belief(task, state)
        on_track = self.known_hops(task, state) == (b.hop if b.entity is not None else 0) and not b.failed
        if not on_track:
            quiet = self.policy_action(task, state, "belief", 0.0, 0.0)[0]
            if canonical(quiet) == canonical(action):
                return "doomed"
        for kind, variant in self._variants(task, state, random.Random(0), "x"):
            if canonical(variant) == canonical(action):
                return "plausible" if kind in PLAUSIBLE else "obvious"
        return "obvious"

    def error_kind(self, task: Task, state: list[Message], action: Message) -> str | None:
        """Which scripted error (a key of ERROR_CATEGORY) `action` is at `state`, or None if it is right.

        Read off the world's truth the way the scripted policy makes its errors, against what the history
        says so far (its belief): a malformed lookup is a slip, an answer after a failed lookup is giving
        up, another attribute than the next one asked for is a skipped hop or a wrong attribute, the right
        attribute of another entity is a distractor (first hop, from the search results) or a made-up
        entity, an answer before the chain is done is premature, a wrong value at the end is a wrong answer
        value. An action that follows the history faithfully but is wrong because of an earlier mistake is
        `carried_error`; anything else is `other`.
        """
        if self.is_correct(task, state, action):
            return None
        calls = tool_calls(action)
        name, args = (calls[0][0], calls[0][1]) if calls else (None, None)
        if name == "lookup" and (args is None or not all(args.get(a) for a in ("entity_id", "attribute"))):
            return "slip"
        b = self.belief(task, state)
        if name == FINAL_ANSWER_TOOL and b.failed:
            return "give_up"
        if not b.searched or name not in ("lookup", FINAL_ANSWER_TOOL):
            return "other"
        quiet = self.policy_action(task, state, "belief", 0.0, 0.0)[0]
        if canonical(quiet) == canonical(action):
            return "carried_error"
        hop = b.hop if b.entity is not None else 0
        right = task.plan[hop] if hop < len(task.plan) else None
        if name == FINAL_ANSWER_TOOL:
            return "premature_answer" if right is not None else "wrong_answer_value"
        if right is None:
            return "other"  # looking further once the chain is done
        if args["attribute"] != right:
            return "skip_hop" if args["attribute"] in task.plan else "wrong_attribute"
        return "distractor_entity" if hop == 0 else "made_up_entity"

    def is_critical(self, task: Task, state: list[Message], action: Message) -> bool:
        """A true critical step: a real mistake made while still on track (not a slip, not a carried error)."""
        return self.action_kind(task, state, action) in ("plausible", "obvious")
