"""Branch rollouts of the candidates' alternatives, with verification against ground truth.

    spark-submit jobs/rollouts.py --config infra/local.yaml [--set key=value ...] [--run-id RUN]

On a cluster ship the package with --py-files (see infra/README.md); locally `cso rollouts` runs the same.
"""

from cso_lib.entry import run_job
from cso_lib.stages.rollouts import run as main

if __name__ == "__main__":
    run_job(main, "rollouts")
