"""Select the failed trajectories of a run (its work set).

    spark-submit jobs/select.py --config infra/local.yaml [--set key=value ...] [--run-id RUN]

On a cluster ship the package with --py-files (see infra/README.md); locally `cso select` runs the same.
"""

from cso_lib.entry import run_job
from cso_lib.stages.select import run as main

if __name__ == "__main__":
    run_job(main, "select")
