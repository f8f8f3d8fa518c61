"""Every stage in order, on one run id: (simulate) -> ingest -> select -> score_policy -> propose ->
score_alternatives -> rollouts -> build_pairs -> taxonomy -> (export) -> summary. Rerunning with the same run id
resumes it. `cso run` and jobs/pipeline.py add the export stage (data card, LLaMA-Factory file, step-level data)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pyspark.sql import SparkSession

from cso_lib.config import Config
from cso_lib.delta_io import ensure_tables, new_run_id, now, record_run
from cso_lib.stages import (
    build_pairs,
    export,
    ingest,
    propose,
    rollouts,
    score_alternatives,
    score_policy,
    select,
    simulate,
    summary,
    taxonomy,
)

log = logging.getLogger("cso")

STAGES = {
    "ingest": ingest.run,
    "select": select.run,
    "score_policy": score_policy.run,
    "propose": propose.run,
    "score_alternatives": score_alternatives.run,
    "rollouts": rollouts.run,
    "build_pairs": build_pairs.run,
    "taxonomy": taxonomy.run,
}


def uses_simulation_logs(cfg: Config) -> bool:
    return not cfg.ingest.paths and cfg.ingest.source_table is None


def run(cfg: Config, spark: SparkSession, skip_ingest: bool = False, exports: bool = False) -> dict:
    cfg.run_id = cfg.run_id or new_run_id()
    started, t0 = now(), time.monotonic()
    spark.sparkContext.setJobDescription(f"cso setup ({cfg.run_id})")  # the tables' creation, in the Spark UI
    ensure_tables(spark, cfg)
    spark.sparkContext.setJobDescription(None)
    results: dict = {}
    if uses_simulation_logs(cfg) and not skip_ingest:
        results["simulate"] = simulate.run(cfg, spark)
    for name, stage in STAGES.items():
        if name == "ingest" and skip_ingest:
            continue
        if name in ("rollouts", "taxonomy") and not cfg.cso.verify:
            results[name] = {"skipped": "cso.verify is false"}  # the taxonomy classifies verified pairs only
            continue
        results[name] = stage(cfg, spark)
        log.info("%s: %s", name, results[name])
    if exports:
        results["export"] = export.run(cfg, spark)
    spark.sparkContext.setJobDescription(f"cso summary ({cfg.run_id})")
    results["summary"] = s = summary.compute(cfg, spark)
    spark.sparkContext.setJobDescription(None)
    # the run is complete: incremental selects (select.incremental) start after this run's trajectories
    record_run(spark, cfg, cfg.run_id, "pipeline", started, time.monotonic() - t0,
               {"rows_in": s.get("trajectories"), "rows_out": s.get("pairs"), "stages": list(results)})
    summary.render(s)
    out = Path(cfg.storage.warehouse) / "_summaries"
    if "://" not in cfg.storage.warehouse:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{cfg.run_id}.json").write_text(json.dumps(results, indent=2, default=str))
    return results
