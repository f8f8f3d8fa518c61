"""Logs of the simulated policy in the native input format (SIMULATION: scripted policy, known truth).

>>> from cso_lib.sim.world import SimWorld
>>> rec = next(iter(trajectory_records(SimWorld(seed=1, n_tasks=2, n_entities=30), 0.2, 0.05, "v0")))
>>> sorted(rec)[:5], rec["env"], rec["steps"][0]["action"]["tool_calls"][0]["function"]["name"]
(['env', 'ground_truth', 'metadata', 'outcome', 'policy_model'], 'sim', 'search')
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from cso_lib.messages import final_answer
from cso_lib.sim.world import SYSTEM_PROMPT, TOOLS, SimWorld

MAX_LOGGED_STEPS = 16


def trajectory_records(world: SimWorld, error_rate: float, slip_rate: float, policy_version: str,
                       round_: int = 0) -> Iterator[dict[str, Any]]:
    """One native-format record per task: the scripted policy run from the task to its answer."""
    for task_id in world.task_ids():
        task = world.task(task_id)
        state = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.query}]
        steps, errors, answer = [], [], None
        for t in range(MAX_LOGGED_STEPS):
            action, error = world.policy_action(task, state, f"log/{round_}", error_rate, slip_rate)
            observations = world.execute(action)
            steps.append({"action": action, "observation": observations[0]["content"] if observations else None})
            if error:
                errors.append({"step": t, "kind": error})
            state.append(action)
            state.extend(observations)
            answer = final_answer(action)
            if answer is not None:
                break
        yield {
            "trajectory_id": f"{task_id}/r{round_}",
            "task_id": task_id,
            "query": task.query,
            "ground_truth": task.answer,
            "outcome": int(world.answer_ok(task, answer)),
            "policy_model": "sim-policy",
            "policy_version": policy_version,
            "env": "sim",
            "round": round_,
            "system_prompt": SYSTEM_PROMPT,
            "tools": TOOLS,
            "steps": steps,
            "metadata": {"simulation": True, "seed": world.seed, "injected_errors": errors},
        }


def write_logs(world: SimWorld, out_dir: str | Path, error_rate: float, slip_rate: float, policy_version: str,
               round_: int = 0) -> Path:
    """Write the logs as JSONL (idempotent: the same settings write the same file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sim-seed{world.seed}-n{world.n_tasks}-round{round_}.jsonl"
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for rec in trajectory_records(world, error_rate, slip_rate, policy_version, round_):
            f.write(orjson.dumps(rec) + b"\n")
    tmp.replace(path)
    return path
