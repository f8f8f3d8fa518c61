"""Baseline datasets (Step-DPO, ETO, RFT) for A/B against CSO, from the same tables, as Parquet.

    spark-submit jobs/baselines.py --config infra/local.yaml [--set key=value ...]

Writes <warehouse>/baselines/{step_dpo,eto,rft}/round=<round>/ (see cso_lib/stages/baselines.py).
"""

from cso_lib.entry import run_job
from cso_lib.stages.baselines import run as main

if __name__ == "__main__":
    run_job(main, "baselines")
