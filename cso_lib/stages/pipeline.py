"""Every stage in order, on one run id: (simulate) -> ingest -> select -> score_policy -> propose ->
score_alternatives -> rollouts -> build_pairs -> summary. Rerunning with the same run id resumes it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pyspark.sql import SparkSession

from cso_lib.config import Config
from cso_lib.delta_io import ensure_tables, new_run_id
from cso_lib.stages import (
    build_pairs,
    ingest,
    propose,
    rollouts,
    score_alternatives,
    score_policy,
    select,
    simulate,
    summary,
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
}


def uses_simulation_logs(cfg: Config) -> bool:
    return not cfg.ingest.paths and cfg.ingest.source_table is None


def run(cfg: Config, spark: SparkSession, skip_ingest: bool = False) -> dict:
    cfg.run_id = cfg.run_id or new_run_id()
    ensure_tables(spark, cfg)
    results: dict = {}
    if uses_simulation_logs(cfg) and not skip_ingest:
        results["simulate"] = simulate.run(cfg, spark)
    for name, stage in STAGES.items():
        if name == "ingest" and skip_ingest:
            continue
        if name == "rollouts" and not cfg.cso.verify:
            results[name] = {"skipped": "cso.verify is false"}
            continue
        results[name] = stage(cfg, spark)
        log.info("%s: %s", name, results[name])
    results["summary"] = summary.compute(cfg, spark)
    summary.render(results["summary"])
    out = Path(cfg.storage.warehouse) / "_summaries"
    if "://" not in cfg.storage.warehouse:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{cfg.run_id}.json").write_text(json.dumps(results, indent=2, default=str))
    return results
