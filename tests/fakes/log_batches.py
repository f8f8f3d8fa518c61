"""Batches of simulated agent logs landing over time (SIMULATION): task ids [lo, hi) of one seeded world.

The tasks of a world depend only on its seed and the task id, so batches of one world never overlap and the
pipeline's simulated models (same seed) can roll them out.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from cso_lib.sim.logs import trajectory_records
from cso_lib.sim.world import SimWorld

SEED, N_ENTITIES, ERROR_RATE = 7, 80, 0.3
# the settings the pipeline needs to simulate the same world and policy as these logs
SIM_SETTINGS = [f"sim.seed={SEED}", f"sim.n_entities={N_ENTITIES}", f"sim.policy_error_rate={ERROR_RATE}"]


def write_batch(folder: Path, name: str, lo: int, hi: int) -> dict[str, int]:
    """Write tasks lo..hi-1 as native JSONL to folder/name; returns {trajectory_id: outcome}."""
    world = SimWorld(seed=SEED, n_tasks=hi, n_entities=N_ENTITIES)
    records = [r for r in trajectory_records(world, ERROR_RATE, 0.05, "sim-policy-v0")
               if int(r["task_id"].rsplit("-", 1)[1]) >= lo]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    tmp.replace(folder / name)
    return {r["trajectory_id"]: r["outcome"] for r in records}


def failed(outcomes: dict[str, int]) -> set[str]:
    return {t for t, o in outcomes.items() if o == 0}
