"""The whole CSO pipeline, every stage in order on one run id.

    spark-submit jobs/pipeline.py --config infra/local.yaml [--set key=value ...] [--run-id RUN] [--skip-ingest]
        [--no-exports]

On a cluster ship the package with --py-files (see infra/README.md); locally `cso run` runs the same.
`--skip-ingest` mines what is already in the warehouse; after per-stage tasks of a scheduler it resumes the run
(every stage finds nothing left), writes its summary and records it complete for incremental runs.
"""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where jobs/select.py would shadow the standard
# library's `select` (imported by socket / selectors).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from cso_lib.entry import run_job  # noqa: E402
from cso_lib.stages.pipeline import run  # noqa: E402

if __name__ == "__main__":
    skip_ingest, exports = "--skip-ingest" in sys.argv, "--no-exports" not in sys.argv
    argv = [a for a in sys.argv[1:] if a not in ("--skip-ingest", "--no-exports")]
    run_job(lambda cfg, spark: run(cfg, spark, skip_ingest=skip_ingest, exports=exports), "pipeline", argv)
