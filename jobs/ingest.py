"""Ingest raw trajectory logs (native JSONL, OpenAI messages, tau-bench, or a Delta table) into Delta.

    spark-submit jobs/ingest.py --config infra/local.yaml [--set key=value ...] [--run-id RUN]

On a cluster ship the package with --py-files (see infra/README.md); locally `cso ingest` runs the same.
"""

from cso_lib.entry import run_job
from cso_lib.stages.ingest import run as main

if __name__ == "__main__":
    run_job(main, "ingest")
