"""The whole CSO pipeline, every stage in order on one run id.

    spark-submit jobs/pipeline.py --config infra/local.yaml [--set key=value ...] [--run-id RUN]

On a cluster ship the package with --py-files (see infra/README.md); locally `cso run` runs the same.
"""

from cso_lib.entry import run_job
from cso_lib.stages.pipeline import run as main

if __name__ == "__main__":
    run_job(main, "pipeline")
