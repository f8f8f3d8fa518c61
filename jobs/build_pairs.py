"""Verified pairs into critical_steps (Delta) and dpo_pairs/ (Parquet).

    spark-submit jobs/build_pairs.py --config infra/local.yaml [--set key=value ...] [--run-id RUN]

On a cluster ship the package with --py-files (see infra/README.md); locally `cso build-pairs` runs the same.
"""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where jobs/select.py would shadow the standard
# library's `select` (imported by socket / selectors).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from cso_lib.entry import run_job  # noqa: E402
from cso_lib.stages.build_pairs import run as main  # noqa: E402

if __name__ == "__main__":
    run_job(main, "build_pairs")
