"""Expert + PRM calls and tokens per verified pair: PRM-first order versus the paper's order. SIMULATION.

Runs the whole pipeline twice on N simulated tasks with the paper's thresholds (gamma_low 0.45, gamma_high
0.65, k 5), each in a fresh warehouse: once in PRM-first order (the default: the expert is asked only where
r_policy < gamma_low) and once in the paper's order (the expert at every step). The simulated roles record
their requests in the `llm_calls` ledger (`sim.record_calls`): one row per distinct request, its hash taken
over the real prompt built by cso_lib.prompts, tokens estimated as characters / 4 of the request's JSON (the
answer's JSON for output tokens; no tokenizer is installed, tiktoken included), cost 0. Every count below is
read from the ledger (`llm_calls`, roles `expert` and `prm`; the taxonomy judge and the policy's rollouts
are the same in both orders and left out), and divided by the verified pairs of `critical_steps`.
Writes bench/results/call_savings.json.

    .venv/bin/python bench/call_savings.py            # 500 tasks (the issue's setting)
    .venv/bin/python bench/call_savings.py --tasks 100
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

from pyspark.sql import functions as F  # noqa: E402

from cso_lib.config import load_config  # noqa: E402
from cso_lib.delta_io import read_table  # noqa: E402
from cso_lib.spark import build_spark  # noqa: E402
from cso_lib.stages import pipeline  # noqa: E402

HERE = Path(__file__).resolve().parent
ROLES = ("expert", "prm")


def measure(spark, cfg) -> dict:
    """Ledger counts of one order's run, and its verified pairs."""
    t0 = time.monotonic()
    result = pipeline.run(cfg, spark)
    seconds = time.monotonic() - t0
    calls = read_table(spark, cfg, "llm_calls").where(F.col("role").isin(*ROLES) & (F.col("run_id") == cfg.run_id))
    by_role = {r["role"]: r.asDict() for r in calls.groupBy("role").agg(
        F.count("*").alias("calls"), F.sum("input_tokens").alias("input_tokens"),
        F.sum("output_tokens").alias("output_tokens"), F.sum("cost_usd").alias("cost_usd")).collect()}
    pairs = {(r["trajectory_id"], r["step_idx"], r["alt_idx"], r["chosen"], r["rejected"]) for r in
             read_table(spark, cfg, "critical_steps").where("verified").collect()}
    policy = read_table(spark, cfg, "prm_scores").where((F.col("alt_idx") == -1) & (F.col("status") == "ok"))
    return {
        "pairs": pairs,
        "calls": sum(r["calls"] for r in by_role.values()),
        "tokens": sum(r["input_tokens"] + r["output_tokens"] for r in by_role.values()),
        "by_role": {role: {k: v for k, v in r.items() if k != "role"} for role, r in sorted(by_role.items())},
        "policy_steps_scored": policy.count(),
        "policy_steps_below_gamma_low": policy.where(F.col("score") < cfg.cso.gamma_low).count(),
        "steps_asked_expert": result["propose"]["steps_asked"],
        "seconds": round(seconds, 1),
        "summary": result["summary"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=500)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=str(HERE / "results" / "call_savings.json"))
    args = p.parse_args()
    work = HERE / "data" / f"call_savings-{args.tasks}-{args.seed}"
    shutil.rmtree(work, ignore_errors=True)
    runs = {}
    spark = None
    for order in ("prm_first", "paper"):
        cfg = load_config(None, [f"storage.warehouse={work / order / 'wh'}", f"sim.logs_dir={work / 'logs'}",
                                 f"sim.n_tasks={args.tasks}", f"sim.seed={args.seed}", f"cso.order={order}",
                                 "sim.record_calls=true"])
        spark = spark or build_spark(cfg, "bench-call-savings")
        runs[order] = measure(spark, cfg)
    spark.stop()
    first, paper = runs["prm_first"], runs["paper"]
    n_first, n_paper = len(first["pairs"]), len(paper["pairs"])
    result = {
        "calls_per_pair_prm_first": first["calls"] / n_first if n_first else None,
        "calls_per_pair_paper": paper["calls"] / n_paper if n_paper else None,
        "tokens_per_pair_prm_first": first["tokens"] / n_first if n_first else None,
        "tokens_per_pair_paper": paper["tokens"] / n_paper if n_paper else None,
        "share_steps_below_gamma_low": first["policy_steps_below_gamma_low"] / first["policy_steps_scored"],
        "same_pairs": first["pairs"] == paper["pairs"],
        "calls_ratio_prm_first_to_paper": first["calls"] / paper["calls"],
        "tokens_ratio_prm_first_to_paper": first["tokens"] / paper["tokens"],
        "verified_pairs": {"prm_first": n_first, "paper": n_paper},
        "ledger": {order: {"calls": r["calls"], "tokens": r["tokens"], "by_role": r["by_role"],
                           "steps_asked_expert": r["steps_asked_expert"]} for order, r in runs.items()},
        "steps_of_failed_trajectories": first["policy_steps_scored"],
        "tasks": args.tasks,
        "seconds_pipeline": {order: r["seconds"] for order, r in runs.items()},
        "counting": "llm_calls rows of roles expert + prm written by the run (one row per distinct request; "
                    "sim.record_calls=true); tokens = input + output, estimated as ceil(characters / 4) of the "
                    "request's and the answer's JSON (no tokenizer installed); the simulated roles cost 0",
        "settings": {"gamma_low": cfg.cso.gamma_low, "gamma_high": cfg.cso.gamma_high, "k": cfg.cso.k,
                     "sim": cfg.sim.model_dump(exclude={"logs_dir"})},
        "command": " ".join([".venv/bin/python", "bench/call_savings.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Spark local[2]",
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),  # the seconds mean little on a busy machine
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
