"""Airflow DAGs: the cso pipeline daily over the day's new logs, and weekly Delta housekeeping.

Copy (or symlink) this file into the Airflow dags folder next to a checkout of this repository, and set the
Airflow Variables `cso_repo` (the checkout), `cso_master` (spark://..., yarn, or k8s://https://...),
`cso_config` (the cso YAML) and `cso_logs` (the root under which each day's logs land as dt=YYYY-MM-DD/).
Needs Airflow >= 2.4; only BashOperator, which runs the repository's submit scripts.

Each daily run works on the run id cso-<ds_nodash>:
1. `ingest` loads that day's folder (re-ingesting a file adds nothing);
2. `mine` runs the pipeline with select.incremental=true and --skip-ingest: only trajectories that arrived
   since the last successful run, whatever day they landed. A retry (or a manual clear) reruns the same run
   id, which resumes: each stage does only what is missing and no model call is paid twice. If a day fails
   for good, the next day's run takes that day's trajectories too.
`max_active_runs=1` keeps the incremental runs in order.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

SUBMIT = (
    "cd {{ var.value.cso_repo }} && "
    "{% if var.value.cso_master.startswith('k8s://') %}"
    "CSO_JOB={job} infra/submit-k8s.sh {{ var.value.cso_master[6:] }}"
    "{% else %}"
    "CSO_JOB={job} infra/submit-standalone.sh {{ var.value.cso_master }} {{ var.value.cso_config }}"
    "{% endif %}"
)
RUN_ID = "--run-id cso-{{ ds_nodash }}"

default_args = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(hours=8),
}

with DAG(
    dag_id="cso_daily",
    description="Critical Step Optimization: failed agent trajectories of the day -> verified DPO pairs",
    schedule="0 3 * * *",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    tags=["cso", "spark", "delta"],
) as daily:
    ingest = BashOperator(
        task_id="ingest",
        bash_command=SUBMIT.replace("{job}", "jobs/ingest.py")
        + " " + RUN_ID + " --set \"ingest.paths=['{{ var.value.cso_logs }}/dt={{ ds }}/']\"",
    )
    mine = BashOperator(
        task_id="mine",
        bash_command=SUBMIT.replace("{job}", "jobs/pipeline.py")
        + " " + RUN_ID + " --skip-ingest --set select.incremental=true",
    )
    ingest >> mine

with DAG(
    dag_id="cso_housekeeping",
    description="OPTIMIZE (Z-ordered), VACUUM and table properties of the cso Delta tables",
    schedule="0 6 * * 0",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    tags=["cso", "delta"],
) as weekly:
    BashOperator(task_id="housekeeping", bash_command=SUBMIT.replace("{job}", "jobs/housekeeping.py"))
