"""The rollout stage on a GPU executor pool: stage-level scheduling on a local-cluster (tests/test_vllm_backend.py).

    CSO_PLACEHOLDER_GPUS=1 .venv-vllm/bin/python tests/gpu_pool_checks.py WORKDIR [--vllm-model DIR]

Starts `local-cluster[2,1,2048]` on loopback (two standalone workers, one executor each, dynamic allocation off)
whose executors each get one GPU from tests/fakes/gpu-discovery-placeholder.sh (placeholder addresses: no
device is used), and runs the simulation's stages up to build_pairs with `rollouts.gpus_per_task=1`: the rollout
stage's tasks run under a ResourceProfile asking for a GPU, every other stage keeps the default profile. Two
rollouts per alternative and two re-rollouts of the original action measure the flip. With --vllm-model it then
reruns the rollout stage with `policy.provider: vllm` (the engine inside the executors, whose Python is this
interpreter). Prints one JSON line `RESULT {...}` with what the test asserts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(work: Path, vllm_model: str | None) -> dict:
    from pyspark.sql import functions as F

    from cso_lib.config import load_config
    from cso_lib.delta_io import new_run_id, read_table
    from cso_lib.spark import build_spark
    from cso_lib.stages import pipeline, rollouts, simulate

    script = str(ROOT / "tests" / "fakes" / "gpu-discovery-placeholder.sh")
    conf = {
        "spark.ui.enabled": "false", "spark.dynamicAllocation.enabled": "false",
        "spark.worker.resource.gpu.amount": "1", "spark.worker.resource.gpu.discoveryScript": script,
        "spark.executor.resource.gpu.amount": "1", "spark.executor.resource.gpu.discoveryScript": script,
        "spark.pyspark.python": sys.executable, "spark.executorEnv.CSO_PLACEHOLDER_GPUS": "1",
        "spark.executorEnv.VLLM_CPU_KVCACHE_SPACE": "1", "spark.executorEnv.HF_HUB_OFFLINE": "1",
        "spark.python.worker.reuse": "true", "spark.executorEnv.PYTHONPATH": str(ROOT),  # a cluster ships a wheel
    }
    base = [
        "spark.master=local-cluster[2,1,2048]", "spark.shuffle_partitions=2", f"spark.conf={json.dumps(conf)}",
        f"storage.warehouse={work / 'wh'}", f"sim.logs_dir={work / 'logs'}", "sim.n_tasks=24", "sim.n_entities=60",
        "sim.policy_error_rate=0.3", "cso.rollouts_per_alternative=2", "cso.original_rollouts=2",
        "rollouts.gpus_per_task=1",
    ]
    cfg = load_config(None, base)
    t0 = time.monotonic()
    spark = build_spark(cfg)
    out: dict = {"startup_s": round(time.monotonic() - t0, 1)}
    out["profile_task_gpus"] = rollouts.rollout_profile(cfg).taskResources["gpu"].amount

    t0 = time.monotonic()
    cfg.run_id = new_run_id()
    simulate.run(cfg, spark)
    for name in ("ingest", "select", "score_policy", "propose", "score_alternatives", "rollouts", "build_pairs"):
        out[f"{name}_stage"] = pipeline.STAGES[name](cfg, spark)
    out["pipeline_s"] = round(time.monotonic() - t0, 1)
    out["executors"] = spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1  # minus the driver
    br = read_table(spark, cfg, "branch_rollouts")
    out["task_resources"] = sorted({r.task_resources for r in br.select("task_resources").distinct().collect()})
    out["statuses"] = {r.status: r["count"] for r in br.groupBy("status").count().collect()}
    out["candidates"] = read_table(spark, cfg, "critical_candidates").where("is_candidate").count()
    out["original_rows"] = br.where("alt_idx = -1").count()
    cs = read_table(spark, cfg, "critical_steps").where("verified")
    out["pairs"] = [r.asDict() for r in cs.select("alt_idx", "rollouts", "successes", "original_rollouts",
                                                   "original_successes", "flip", "sim_true_fix", "verifier").collect()]
    # the other stages ran without the profile: the ingest/score tasks got no GPU (a default-profile job now)
    plain = spark.range(0, 4, 1, 2).rdd.mapPartitions(
        lambda _: [json.dumps({k: v.addresses for k, v in __import__("pyspark").TaskContext.get().resources().items()})])
    out["default_profile_resources"] = sorted(set(plain.collect()))

    if vllm_model:
        vcfg = load_config(None, [*base, f"run_id={cfg.run_id}", "cso.max_steps_after_branch=2",
                                  "cso.original_rollouts=0", "cso.rollouts_per_alternative=1",
                                  f"policy={{provider: vllm, model: '{vllm_model}', params: {{max_tokens: 12, "
                                  "dtype: float32, max_model_len: 4096, enforce_eager: true, seed: 1, "
                                  "kv_cache_memory_bytes: 268435456}}"])
        t0 = time.monotonic()
        out["vllm_stage"] = rollouts.run(vcfg, spark)
        out["vllm_s"] = round(time.monotonic() - t0, 1)
        vb = read_table(spark, vcfg, "branch_rollouts").where(F.col("policy_model") == f"vllm:{vllm_model}")
        out["vllm_rows"] = [r.asDict() for r in vb.select("status", "steps_after_branch", "continuation",
                                                          "task_resources").collect()]
    spark.stop()
    return out


if __name__ == "__main__":
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("CSO_PLACEHOLDER_GPUS", "1")
    args = sys.argv[1:]
    model = args[args.index("--vllm-model") + 1] if "--vllm-model" in args else None
    print("RESULT " + json.dumps(main(Path(args[0]), model), default=str), flush=True)
