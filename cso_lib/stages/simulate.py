"""Write the simulation world's logs (native format JSONL): the embedded default's input. SIMULATION."""

from __future__ import annotations

from pathlib import Path

from pyspark.sql import SparkSession

from cso_lib.config import Config
from cso_lib.sim.logs import write_logs
from cso_lib.sim.world import SimWorld


def run(cfg: Config, spark: SparkSession | None = None) -> dict:
    world = SimWorld.from_config(cfg.sim)
    path = write_logs(world, cfg.sim_logs_dir, cfg.sim.policy_error_rate, cfg.sim.policy_slip_rate,
                      cfg.sim.policy_version, cfg.round)
    return {"path": str(path), "trajectories": cfg.sim.n_tasks, "bytes": Path(path).stat().st_size}
