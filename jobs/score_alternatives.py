"""PRM scores of the alternatives, then candidate selection (the paper's rule).

    spark-submit jobs/score_alternatives.py --config infra/local.yaml [--set key=value ...] [--run-id RUN]

On a cluster ship the package with --py-files (see infra/README.md); locally `cso score-alternatives` runs the same.
"""

from cso_lib.entry import run_job
from cso_lib.stages.score_alternatives import run as main

if __name__ == "__main__":
    run_job(main, "score_alternatives")
