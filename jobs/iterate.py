"""Iterative CSO rounds: evaluate -> mine failures -> DPO -> register the policy version; repeat.

    spark-submit jobs/iterate.py --config my.yaml --set iterate.rounds=3 --set iterate.initial_model=/models/v0

Locally `cso iterate` runs the same (on the embedded default: the tiny local model and the simulation world).
"""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where jobs/select.py would shadow the standard
# library's `select` (imported by socket / selectors).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from cso_lib.entry import run_job  # noqa: E402
from cso_lib.stages.iterate import run as main  # noqa: E402

if __name__ == "__main__":
    run_job(main, "iterate")
