"""Verified pairs into critical_steps (Delta) and dpo_pairs/ (Parquet).

    spark-submit jobs/build_pairs.py --config infra/local.yaml [--set key=value ...] [--run-id RUN]

On a cluster ship the package with --py-files (see infra/README.md); locally `cso build-pairs` runs the same.
"""

from cso_lib.entry import run_job
from cso_lib.stages.build_pairs import run as main

if __name__ == "__main__":
    run_job(main, "build_pairs")
