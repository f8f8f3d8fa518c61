"""Ingestion at scale: our ingest stage vs a bare Spark job over the same JSONL, on one local[2] session.

    SPARK_LOCAL_IP=127.0.0.1 .venv/bin/python bench/ingest_scale.py            # 100k trajectories, ~1M steps
    SPARK_LOCAL_IP=127.0.0.1 .venv/bin/python bench/ingest_scale.py --trajectories 5000

The log file is generated once by bench/gen_logs.py (seeded) into bench/data/ and reused. After a warm-up
of both jobs on a small slice (so neither pays JVM/Python start-up), it measures:

(a) `seconds`: cso's ingest stage into a fresh warehouse (parse + validate + convert every record, staging
    Parquet written by the Python pass, verdict checks, insert-only writes into `quarantine`, `steps`,
    `trajectories`, the `runs` record), then selecting the failures: `trajectories` where outcome = 0 joined
    to their step counts in `steps`, counted.
(b) `bare_spark_seconds`: the plain job as one would write it: spark.read.json (schema inferred), filter
    outcome = 0, posexplode the steps, write Parquet. No validation, no quarantine, no Delta, no idempotence.
    `bare_explicit_schema_seconds` is the same job given the schema up front (no inference pass), the
    fastest bare variant; `ratio_vs_explicit_schema` compares with it.

Each is timed `--repeat` times (default 2), alternating ours / bare / bare explicit, and the best time of each
counts (every time is in `runs`); so the JIT's warm-up and the OS page cache favour neither.
Writes bench/results/ingest_scale.json (ratio = seconds / bare_spark_seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from gen_logs import generate
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from cso_lib.config import Config, load_config
from cso_lib.spark import build_spark
from cso_lib.stages import ingest

T = TypeVar("T")
BENCH = Path(__file__).resolve().parent
BARE_SCHEMA = (
    "trajectory_id string, task_id string, query string, outcome int, steps array<struct<"
    "action: struct<content: string, tool_calls: array<struct<id: string, type: string, "
    "function: struct<name: string, arguments: string>>>>, observation: string>>"
)


def ours(cfg: Config, spark: SparkSession) -> tuple[dict, int]:
    stats = ingest.run(cfg, spark)
    wh = cfg.storage.warehouse
    failed = spark.sql(
        f"SELECT t.trajectory_id, count(*) AS n FROM delta.`{wh}/trajectories` t "
        f"JOIN delta.`{wh}/steps` s ON s.trajectory_id = t.trajectory_id WHERE t.outcome = 0 GROUP BY t.trajectory_id"
    ).count()
    return stats, failed


def bare(spark: SparkSession, path: Path, out: Path, explicit_schema: bool = False) -> None:
    reader = spark.read.schema(BARE_SCHEMA) if explicit_schema else spark.read
    (
        reader.json(str(path))
        .filter(F.col("outcome") == 0)
        .select("trajectory_id", F.posexplode("steps").alias("step_idx", "step"))
        .select("trajectory_id", "step_idx", "step.action", "step.observation")
        .write.mode("overwrite")
        .parquet(str(out))
    )


def timed(fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-mb", type=int, default=64, help="ingest.split_bytes in MiB")
    parser.add_argument("--driver-memory", default="6g")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each job; the best counts")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "ingest_scale.json")
    args = parser.parse_args()

    data = BENCH / "data"
    logs = data / f"logs-n{args.trajectories}-seed{args.seed}.jsonl"
    warm = data / "logs-n500-seed1.jsonl"
    for path, n, seed in ((logs, args.trajectories, args.seed), (warm, 500, 1)):
        if not path.exists():
            print(f"generating {path} ...", flush=True)
            print(generate(path, n, seed), flush=True)
    work = data / "run"
    shutil.rmtree(work, ignore_errors=True)

    def cfg_for(name: str, path: Path) -> Config:
        return load_config(
            None,
            [
                "spark.master=local[2]",
                f"spark.conf={{spark.driver.memory: {args.driver_memory}, spark.ui.enabled: 'false', "
                f"spark.sql.warehouse.dir: '{work / 'spark-warehouse'}'}}",
                f"storage.warehouse={work / name}",
                f"ingest.paths=[{path}]",
                f"ingest.split_bytes={args.split_mb * 1024 * 1024}",
            ],
        )

    spark = build_spark(cfg_for("warehouse", logs), "bench-ingest")
    ours(cfg_for("warm-warehouse", warm), spark)
    bare(spark, warm, work / "warm-bare")
    bare(spark, warm, work / "warm-bare-explicit", True)

    load_before = os.getloadavg()[0]
    runs: dict[str, list[float]] = {"ours": [], "bare": [], "bare_explicit_schema": []}
    for i in range(args.repeat):
        t, (stats, failed) = timed(ours, cfg_for(f"warehouse-{i}", logs), spark)
        runs["ours"].append(round(t, 2))
        print(f"ours #{i}: {t:.1f} s {stats} failed={failed}", flush=True)
        for name, explicit in (("bare", False), ("bare_explicit_schema", True)):
            t, _ = timed(bare, spark, logs, work / f"{name}-{i}", explicit)
            runs[name].append(round(t, 2))
            print(f"{name} #{i}: {t:.1f} s", flush=True)
        for name in (f"warehouse-{i}", f"bare-{i}", f"bare_explicit_schema-{i}"):
            shutil.rmtree(work / name, ignore_errors=True)
    spark.stop()
    seconds, bare_seconds, explicit_seconds = (min(runs[k]) for k in runs)

    n_steps = stats["steps_new"]  # a fresh warehouse: every step of every accepted record
    result = {
        "trajectories": stats["read"],
        "steps": n_steps,
        "bytes": logs.stat().st_size,
        "failed_trajectories": failed,
        "seconds": round(seconds, 2),
        "bare_spark_seconds": round(bare_seconds, 2),
        "ratio": round(seconds / bare_seconds, 3),
        "bare_explicit_schema_seconds": round(explicit_seconds, 2),
        "ratio_vs_explicit_schema": round(seconds / explicit_seconds, 3),
        "steps_per_second": round(n_steps / seconds),
        "runs": runs,
        "ingest_stats": {k: v for k, v in stats.items() if k != "run_id"},
        "command": " ".join(
            ["SPARK_LOCAL_IP=127.0.0.1", ".venv/bin/python", "bench/ingest_scale.py", *sys.argv[1:]]
        ),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "spark_master": "local[2]",
            "driver_memory": args.driver_memory,
            "split_mb": args.split_mb,
            "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
            "note": "2 cores shared with other processes; a 1-minute load average above 2 means the timings "
            "include contention",
        },
        "measured": {
            "seconds": "cso ingest stage into a fresh Delta warehouse + count of failed trajectories joined to steps "
            "(best of `runs`; each job's times in `runs`)",
            "bare_spark_seconds": "spark.read.json (inferred schema) -> filter outcome=0 -> posexplode steps -> Parquet",
            "bare_explicit_schema_seconds": "the same with the schema given up front",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
