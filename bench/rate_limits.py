"""Rate limits on a multi-process cluster: Spark `local-cluster[2,1,1024]` (2 executor JVMs, one Python worker
each) calling the rate-limited loopback server through the provider-backed PRM role, as the stages do.

    SPARK_LOCAL_IP=127.0.0.1 PYSPARK_PYTHON=.venv/bin/python .venv/bin/python bench/rate_limits.py
    .venv/bin/python bench/rate_limits.py --rpm 600 --minutes 2.6        # the defaults

The server (tests/fakes/llm_server.py, a subprocess) admits `rpm` requests per sliding 60 s window and
answers 429 with Retry-After beyond that; every answer carries OpenAI's x-ratelimit-* headers. Each phase
is one Spark job: a DataFrame of distinct PRM requests in `tasks_at_once` = 2 partitions, one task per
executor, each sending through `LLMRole.complete` (its own AdaptiveLimiter with share 1/tasks_at_once of
the configured job-wide budget, 16 requests in flight, bounded retries). The number of requests is sized
to last `minutes` at the true limit.

(a) configured limit = the server's: `rpm_share` = requests admitted per minute over the phase (first send
    to last answer) / the limit; `share_429` = 429 answers / all answers.
(b) configured at twice the server's limit: the limiter learns the true limit from the headers and 429s;
    `overconfigured_rpm_share`, `overconfigured_share_429`, and `overconfigured_complete` = every request
    answered ok.

(c) informative, not a target: at twice the limit against a server that sends no rate-limit headers, so
    the limiter learns from 429s (and Retry-After) alone: `phases.overconfigured_no_headers`.

`*_steady` variants count only the middle 90% of each phase (leaving out the executors' start-up skew and
the tail where one task has finished). Writes bench/results/rate_limits.json with the command, the date and
the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql.types import IntegerType, StringType, StructField, StructType  # noqa: E402

from cso_lib.config import Config, load_config  # noqa: E402
from cso_lib.spark import build_spark  # noqa: E402
from cso_lib.stages.common import map_batches  # noqa: E402

OUT = StructType([StructField("i", IntegerType(), False), StructField("status", StringType(), False),
                  StructField("attempts", IntegerType(), False)])


def start_server(rpm: int, log: Path, headers: bool = True) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakes" / "llm_server.py"), "--port", "0",
                             "--rpm", str(rpm), "--window-s", "60", "--log", str(log),
                             *([] if headers else ["--no-rate-headers"])],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"the fake server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{line.split()[1]}"


def call_rows(cfg_json: str, rows: list[dict]) -> list[dict]:
    """Executor side: the PRM role's requests for these rows, through its limiter (as a stage sends them)."""
    from cso_lib.models import get_models

    prm = get_models(cfg_json).prm
    reqs = [prm.request([{"role": "system", "content": "Rate the step; give a JSON score."},
                         {"role": "user", "content": f"step {r['i']}"}], response_format="json") for r in rows]
    results = prm.complete(reqs, None)
    return [{"i": r["i"], "status": res.status, "attempts": res.attempts} for r, res in zip(rows, results, strict=True)]


def phase(spark: SparkSession, cfg: Config, n: int, tasks: int) -> dict:
    cfg_json = cfg.model_dump_json()
    # an even split (contiguous ranges): a task that finishes early leaves its share of the budget unused,
    # which is the static split's price, not the limiter's (a stage's tasks are uneven: see the README)
    df = spark.range(0, n, 1, tasks).selectExpr("CAST(id AS INT) AS i")
    t0 = time.time()
    rows = map_batches(df, lambda rows: call_rows(cfg_json, rows), OUT).collect()
    return {"rows": rows, "t0": t0, "t1": time.time()}


def measure(log: list[dict], t0: float, t1: float, rpm: int, rows: list, n: int) -> dict:
    sent = [e for e in log if t0 <= e["t"] <= t1 + 1]
    ok = sorted(e["t"] for e in sent if e["outcome"] == "ok")
    n429 = sum(e["outcome"].startswith("429") for e in sent)
    span = ok[-1] - ok[0]
    lo, hi = ok[0] + 0.05 * span, ok[0] + 0.95 * span
    steady = [t for t in ok if lo <= t <= hi]
    sent_steady = [e for e in sent if lo <= e["t"] <= hi]
    return {
        "requests": n,
        "sends": len(sent),
        "answered_ok": len(ok),
        "answered_429": n429,
        "seconds": round(span, 2),
        "rpm_achieved": round((len(ok) - 1) / span * 60, 2),
        "rpm_share": round((len(ok) - 1) / span * 60 / rpm, 4),
        "share_429": round(n429 / len(sent), 4),
        "rpm_share_steady": round((len(steady) - 1) / (hi - lo) * 60 / rpm, 4),
        "share_429_steady": round(sum(e["outcome"].startswith("429") for e in sent_steady) / len(sent_steady), 4),
        "complete": sum(r["status"] == "ok" for r in rows) == n,
        "max_attempts_used": max(r["attempts"] for r in rows),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rpm", type=int, default=600, help="the server's true limit (requests per 60 s)")
    p.add_argument("--minutes", type=float, default=2.6, help="length of each phase at the true limit")
    p.add_argument("--master", default="local-cluster[2,1,1024]")
    p.add_argument("--out", default=str(BENCH / "results" / "rate_limits.json"))
    p.add_argument("--no-headers-phase", action=argparse.BooleanOptionalAction, default=True,
                   help="a third phase at twice the limit against a server that sends no rate-limit headers "
                        "(the limiter adapts from 429s alone); reported under phases only")
    a = p.parse_args(argv)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # executors start in their own work folders: a relative interpreter path would not resolve there
    os.environ["PYSPARK_PYTHON"] = os.path.abspath(os.environ.get("PYSPARK_PYTHON") or sys.executable)
    tasks = 2
    n = int(a.rpm * a.minutes)
    work = ROOT / ".cache" / "bench_rate_limits"
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    results: dict = {}
    spark = None
    phases = [("configured_right", 1.0, True), ("overconfigured", 2.0, True)]
    if a.no_headers_phase:
        phases.append(("overconfigured_no_headers", 2.0, False))
    for name, factor, headers in phases:
        log_path = work / f"{name}.jsonl"
        log_path.unlink(missing_ok=True)
        proc, url = start_server(a.rpm, log_path, headers)
        try:
            cfg = load_config(None, [
                f"spark.master={a.master}", "spark.shuffle_partitions=2", f"storage.warehouse={work / 'wh'}",
                f"tasks_at_once={tasks}",
                f"spark.conf={{spark.executorEnv.PYTHONPATH: '{ROOT}', spark.python.worker.reuse: 'true', "
                "spark.ui.enabled: 'false'}",
                "prm.provider=openai", f"prm.base_url={url}/v1", "prm.model=bench-judge",
                f"prm.requests_per_minute={a.rpm * factor}", "prm.max_attempts=20", "prm.deadline_s=3600",
                "prm.concurrency=16", "prm.timeout_s=30",
            ])
            if spark is None:
                spark = build_spark(cfg, "bench-rate-limits")
                cores = spark.sparkContext.defaultParallelism
                if cores != tasks:  # the budget split assumes exactly tasks_at_once concurrent tasks
                    raise SystemExit(f"{a.master} runs {cores} tasks at once, tasks_at_once={tasks}")
            # a different base_url per phase: get_models' cache in the reused Python workers builds a new role
            # (and limiter) for each phase, as a new job would
            out = phase(spark, cfg, n, tasks)
        finally:
            proc.terminate()
            proc.wait()
        log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        results[name] = measure(log, out["t0"], out["t1"], a.rpm, out["rows"], n)
        print(name, json.dumps(results[name]), flush=True)
    if spark is not None:
        spark.stop()
    right, over = results["configured_right"], results["overconfigured"]
    doc = {
        "rpm_share": right["rpm_share"],
        "share_429": right["share_429"],
        "overconfigured_rpm_share": over["rpm_share"],
        "overconfigured_share_429": over["share_429"],
        "overconfigured_complete": over["complete"],
        "targets": {"rpm_share": ">= 0.97", "share_429": "<= 0.01", "overconfigured_rpm_share": ">= 0.85",
                    "overconfigured_share_429": "<= 0.05", "overconfigured_complete": True},
        "phases": results,
        "server": {"rpm": a.rpm, "window_s": 60, "rate_headers": "x-ratelimit-* on every answer (phases a, b)"},
        "spark_master": a.master,
        "tasks_at_once": tasks,
        "minutes_of_calls": round(sum(r["seconds"] for r in results.values()) / 60, 2),
        "command": "SPARK_LOCAL_IP=127.0.0.1 PYSPARK_PYTHON=.venv/bin/python .venv/bin/python bench/rate_limits.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in list(doc)[:5]}, indent=2))
    return doc


if __name__ == "__main__":
    main()
