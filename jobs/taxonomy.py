"""Error taxonomy of the verified critical steps (critical_steps.error_category), from the judge model.

    spark-submit jobs/taxonomy.py --config infra/local.yaml [--set key=value ...] [--run-id RUN]

On a cluster ship the package with --py-files (see infra/README.md); locally `cso taxonomy` runs the same.
"""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where jobs/select.py would shadow the standard
# library's `select` (imported by socket / selectors).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from cso_lib.entry import run_job  # noqa: E402
from cso_lib.stages.taxonomy import run as main  # noqa: E402

if __name__ == "__main__":
    run_job(main, "taxonomy")
