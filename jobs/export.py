"""Per-round exports next to the pairs: data card, LLaMA-Factory ranking file, step credit, PRM stepwise data.

    spark-submit jobs/export.py --config infra/local.yaml [--set round=0]

Locally `cso export` runs the same; `cso run` runs it after build_pairs.
"""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where jobs/select.py would shadow the standard
# library's `select` (imported by socket / selectors).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from cso_lib.entry import run_job  # noqa: E402
from cso_lib.stages.export import run as main  # noqa: E402

if __name__ == "__main__":
    run_job(main, "export")
