"""Baseline datasets (Step-DPO, ETO, RFT) for A/B against CSO, from the same tables, as Parquet.

    spark-submit jobs/baselines.py --config infra/local.yaml [--set key=value ...]

Writes <warehouse>/baselines/{step_dpo,eto,rft}/round=<round>/ (see cso_lib/stages/baselines.py).
"""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where jobs/select.py would shadow the standard
# library's `select` (imported by socket / selectors).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from cso_lib.entry import run_job  # noqa: E402
from cso_lib.stages.baselines import run as main  # noqa: E402

if __name__ == "__main__":
    run_job(main, "baselines")
