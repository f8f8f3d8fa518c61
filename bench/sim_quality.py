"""Quality of the pipeline's pairs on the simulation world, where the truth is known. SIMULATION.

Runs the whole pipeline (local[2], fresh warehouse) on N simulated tasks with the paper's thresholds, then
the "w/o verification" ablation over the same scores, and writes bench/results/sim_quality.json:
precision of verified pairs (share whose chosen action really fixes the step), precision without
verification, recall of true critical steps, pair counts.

    .venv/bin/python bench/sim_quality.py            # 500 tasks (the issue's setting)
    .venv/bin/python bench/sim_quality.py --tasks 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from cso_lib.config import load_config  # noqa: E402
from cso_lib.spark import build_spark  # noqa: E402
from cso_lib.stages import pipeline  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=500)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=str(HERE / "results" / "sim_quality.json"))
    args = p.parse_args()
    work = HERE / "data" / f"sim_quality-{args.tasks}-{args.seed}"
    shutil.rmtree(work, ignore_errors=True)
    cfg = load_config(None, [f"storage.warehouse={work / 'wh'}", f"sim.logs_dir={work / 'logs'}",
                             f"sim.n_tasks={args.tasks}", f"sim.seed={args.seed}"])
    spark = build_spark(cfg, "bench-sim-quality")
    t0 = time.monotonic()
    verified = pipeline.run(cfg, spark)["summary"]
    t1 = time.monotonic()
    nv = cfg.model_copy(deep=True)
    nv.cso.verify = False
    unverified = pipeline.run(nv, spark, skip_ingest=True)["summary"]
    t2 = time.monotonic()
    spark.stop()
    result = {
        "precision_verified": verified["precision"],
        "precision_no_verify": unverified["precision"],
        "recall": verified["recall"],
        "recall_no_verify": unverified["recall"],
        "pairs_verified": verified["pairs"],
        "pairs_no_verify": unverified["pairs"],
        "tasks": args.tasks,
        "failed_trajectories": verified["trajectories"],
        "steps_of_failed_trajectories": verified["steps"],
        "candidates": verified["candidates"],
        "true_critical_steps": verified["true_critical_steps"],
        "share_steps_supervised": verified["share_steps_supervised"],
        "seconds_pipeline_verified": round(t1 - t0, 1),
        "seconds_pipeline_no_verify": round(t2 - t1, 1),
        "settings": {"gamma_low": cfg.cso.gamma_low, "gamma_high": cfg.cso.gamma_high, "k": cfg.cso.k,
                     "sim": cfg.sim.model_dump(exclude={"logs_dir"})},
        "command": " ".join([".venv/bin/python", "bench/sim_quality.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Spark local[2]",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
