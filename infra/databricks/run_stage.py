"""Databricks entry: run one of the repository's Spark jobs (jobs/<name>.py) from the bundle's synced files.

    python_file: run_stage.py, parameters: [<job name>, --config, <yaml>, --run-id, <id>, --set, k=v, ...]

Databricks Runtime already holds a SparkSession with Delta; the job's builder attaches to it (its master is
null in the config). The synced repository root goes on sys.path, so cso_lib and schemas import as they do
from a checkout.
"""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: run_stage.py <job name, e.g. pipeline> [job arguments]")
    job = ROOT / "jobs" / f"{sys.argv.pop(1)}.py"
    if not job.is_file():
        sys.exit(f"run_stage.py: no job {job.name!r} in {job.parent}")
    sys.path.insert(0, str(ROOT))
    runpy.run_path(str(job), run_name="__main__")
