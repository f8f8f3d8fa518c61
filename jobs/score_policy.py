"""PRM scores of the policy's own actions.

    spark-submit jobs/score_policy.py --config infra/local.yaml [--set key=value ...] [--run-id RUN]

On a cluster ship the package with --py-files (see infra/README.md); locally `cso score-policy` runs the same.
"""

from cso_lib.entry import run_job
from cso_lib.stages.score_policy import run as main

if __name__ == "__main__":
    run_job(main, "score_policy")
