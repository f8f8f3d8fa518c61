"""Success rate of a policy on held-out simulation tasks, with a 95% Wilson interval, into `policy_evals`.

    spark-submit jobs/evaluate.py --config my.yaml --set policy.provider=transformers --set policy.model=/models/v1

Locally `cso evaluate` runs the same.
"""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where jobs/select.py would shadow the standard
# library's `select` (imported by socket / selectors).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from cso_lib.entry import run_job  # noqa: E402
from cso_lib.stages.evaluate import run as main  # noqa: E402

if __name__ == "__main__":
    run_job(main, "evaluate")
