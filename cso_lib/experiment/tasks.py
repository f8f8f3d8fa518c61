"""The experiment's task family: the simulation world's multi-hop look-ups with a compact prompt. SIMULATION.

Tasks, tools, observations, the solver and the verifier are the simulation world's (`cso_lib.sim.world`);
only the words the policy reads are shorter (the tiny model is trained on CPU, and every prompt token costs):
a one-line system prompt naming the tools, no tool schemas, and the query as the person's name plus the chain
of attributes. Task ids are the world's (`sim-<seed>-<i>`), so the pipeline's simulated expert, PRM and
environment replay them unchanged.

Task sets: `experiment_splits` (SFT demonstrations, validation, mined train tasks, held-out), disjoint by
construction; no held-out question (person, attribute chain) occurs in another set.

>>> from cso_lib.sim.world import SimWorld
>>> w = SimWorld(seed=3, n_tasks=40, n_entities=60)
>>> tid = w.task_ids()[0]
>>> preamble(w, tid)[1]["content"].startswith("Person: ")
True
>>> demo = demonstration(w, tid)
>>> w.answer_ok(w.task(tid), final_answer(demo[-1])), demo[2]["tool_calls"][0]["function"]["name"]
(True, 'search')
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cso_lib.messages import Message, final_answer
from cso_lib.models import StepRequest
from cso_lib.sim.world import SimWorld

ENV = "sim"
COMPACT_SYSTEM = (
    "Answer with tools: search(query) finds a person by name; lookup(entity_id, attribute) reads one "
    "attribute; final_answer(answer). Follow the chain, one lookup per step."
)


def compact_query(world: SimWorld, task_id: str) -> str:
    task = world.task(task_id)
    return f"Person: {world.kb[task.person_id]['name']}. Chain: {' -> '.join(task.plan)}."


def preamble(world: SimWorld, task_id: str) -> list[Message]:
    return [{"role": "system", "content": COMPACT_SYSTEM}, {"role": "user", "content": compact_query(world, task_id)}]


def experiment_splits(world: SimWorld, n_sft: int, n_val: int, n_mine: int, n_test: int) -> dict[str, list[str]]:
    """The paper table's four task sets, in index order and disjoint by construction:

    - `sft`: [0, n_sft), the solver's demonstrations (the SFT data);
    - `val`: the next n_val tasks whose question (person, attribute chain) is not an SFT task's: pi0's SFT step
      count is picked on these, never on the held-out tasks;
    - `mine`: the next n_mine tasks, the train tasks the policy runs and the pipeline mines;
    - `test`: the next n_test tasks whose question occurs in none of the above (held-out).

    >>> w = SimWorld(seed=3, n_tasks=40, n_entities=60, min_hops=1, max_hops=2)
    >>> sp = experiment_splits(w, 20, 5, 5, 10)
    >>> [len(sp[k]) for k in ("sft", "val", "mine", "test")], len({t for ids in sp.values() for t in ids})
    ([20, 5, 5, 10], 40)
    """
    question = lambda tid: (world.task(tid).person_id, world.task(tid).plan)  # noqa: E731
    index = iter(range(10**7))
    nxt = lambda: f"sim-{world.seed}-{next(index):04d}"  # noqa: E731
    out: dict[str, list[str]] = {"sft": [nxt() for _ in range(n_sft)], "val": [], "mine": [], "test": []}
    seen = {question(t) for t in out["sft"]}
    while len(out["val"]) < n_val:
        tid = nxt()
        if question(tid) not in seen:
            out["val"].append(tid)
    out["mine"] = [nxt() for _ in range(n_mine)]
    seen |= {question(t) for t in out["val"] + out["mine"]}
    while len(out["test"]) < n_test:
        tid = nxt()
        if question(tid) not in seen:
            out["test"].append(tid)
    return out


def demonstration(world: SimWorld, task_id: str) -> list[Message]:
    """The solver's trajectory for a task, as one conversation (the SFT data)."""
    task = world.task(task_id)
    msgs = preamble(world, task_id)
    for t in range(2 + len(task.plan)):
        action = world.solver_action(task, msgs, call_id=f"call_{t}_0")
        msgs.append(action)
        msgs.extend(world.execute(action))
        if final_answer(action) is not None:
            break
    return msgs


_ENTITY_ID = re.compile(r"\b([PCTN])(\d{4})\b")


def relabel(world: SimWorld, task_id: str, messages: list[Message], rng: random.Random) -> list[Message]:
    """A demonstration with its entity ids and its answer value replaced at random, consistently within the
    conversation (ids by other ids of the same type, one to one; the answer by another entity's value of the
    same attribute). SFT data augmentation: the relabelled facts are not the world's, so a model trained on them
    cannot answer from memorised facts and must copy ids and values from the observations, which is what the
    held-out tasks need (without it the tiny model memorises the train facts: 100% on train, ~20% held out).

    >>> w = SimWorld(seed=3, n_tasks=5, n_entities=60, min_hops=2, max_hops=2)
    >>> tid = w.task_ids()[0]
    >>> demo = demonstration(w, tid)
    >>> new = relabel(w, tid, demo, random.Random(0))
    >>> new != demo, [m["role"] for m in new] == [m["role"] for m in demo]
    (True, True)
    >>> final_answer(new[-1]) != w.task(tid).answer and final_answer(new[-1]) in new[-2]["content"]
    True
    """
    task = world.task(task_id)
    text = json.dumps(messages)
    found = dict.fromkeys(m.group(0) for m in _ENTITY_ID.finditer(text))
    by_type: dict[str, list[str]] = {}
    for eid in found:
        by_type.setdefault(eid[0], []).append(eid)
    mapping = {}
    for prefix, ids in by_type.items():
        pool = [e for e in world.kb if e[0] == prefix]
        mapping.update(zip(ids, rng.sample(pool, len(ids)), strict=True))
    text = _ENTITY_ID.sub(lambda m: mapping[m.group(0)], text)
    owner_type = world.kb[task.chain[-2]]["type"]
    values = sorted({row[task.plan[-1]] for row in world.kb.values() if row["type"] == owner_type} - {task.answer})
    text = text.replace(json.dumps(task.answer)[1:-1], json.dumps(rng.choice(values))[1:-1])
    return json.loads(text)


@dataclass
class Episode:
    trajectory_id: str
    task_id: str
    messages: list[Message]
    answer: str | None = None
    done: bool = False
    n_steps: int = 0
    success: bool = False
    extra: dict = field(default_factory=dict)


def run_episodes(policy, world: SimWorld, items: Iterable[tuple[str, str]], max_steps: int = 8,
                 key: str = "episode") -> list[Episode]:
    """Run the policy on (trajectory_id, task_id) items in lockstep (one batched `act` per turn) until each
    answers or takes `max_steps` actions. An action with no tool call ends the episode without an answer."""
    eps = [Episode(tid, task, preamble(world, task)) for tid, task in items]
    for t in range(max_steps):
        active = [e for e in eps if not e.done]
        if not active:
            break
        reqs = [StepRequest(e.trajectory_id, e.task_id, ENV, t, list(e.messages), None, key=key) for e in active]
        for e, action in zip(active, policy.act(reqs), strict=True):
            if not (action.get("content") or action.get("tool_calls")):
                action = {**action, "content": "(no output)"}
            e.messages.append(action)
            e.n_steps += 1
            e.answer = final_answer(action)
            if e.answer is not None or not action.get("tool_calls"):
                e.done = True
            else:
                e.messages.extend(world.execute(action))
    for e in eps:
        e.success = world.answer_ok(world.task(e.task_id), e.answer)
    return eps


def log_record(world: SimWorld, ep: Episode, policy_model: str, policy_version: str, round_: int) -> dict:
    """An episode in the native input format (`messages` form), as the pipeline ingests it."""
    task = world.task(ep.task_id)
    return {
        "trajectory_id": ep.trajectory_id,
        "task_id": ep.task_id,
        "query": ep.messages[1]["content"],
        "ground_truth": task.answer,
        "outcome": int(ep.success),
        "policy_model": policy_model,
        "policy_version": policy_version,
        "env": ENV,
        "round": round_,
        "system_prompt": COMPACT_SYSTEM,
        "tools": None,
        "messages": ep.messages,
        "metadata": {"simulation": True, "seed": world.seed, "experiment": "paper_table"},
    }


def write_logs(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return path


def success_rate(eps: list[Episode]) -> float:
    return sum(e.success for e in eps) / max(1, len(eps))
