"""Expert alternatives at the steps that can still qualify.

    spark-submit jobs/propose.py --config infra/local.yaml [--set key=value ...] [--run-id RUN]

On a cluster ship the package with --py-files (see infra/README.md); locally `cso propose` runs the same.
"""

from cso_lib.entry import run_job
from cso_lib.stages.propose import run as main

if __name__ == "__main__":
    run_job(main, "propose")
