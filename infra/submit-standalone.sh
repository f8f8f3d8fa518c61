#!/usr/bin/env bash
# Submit a cso job (default: the whole pipeline) to a Spark standalone master, or to YARN with --master yarn.
#   infra/submit-standalone.sh spark://master:7077 infra/cluster.example.yaml [--set key=value ...] [--run-id RUN]
#   CSO_PROPERTIES=infra/spark/yarn.conf infra/submit-standalone.sh yarn infra/cluster.example.yaml
# Environment (all optional):
#   CSO_JOB           the entry point (default jobs/pipeline.py; e.g. jobs/housekeeping.py)
#   CSO_PROPERTIES    a spark-submit --properties-file (default infra/spark/standalone.conf)
#   CSO_PY_FILES      the package to ship (a wheel or zip); default: a wheel built from this checkout
#   CSO_SUBMIT_ARGS   extra spark-submit arguments, e.g. "--executor-memory 4g --total-executor-cores 32"
#   SPARK_SUBMIT      the spark-submit to use (default .venv/bin/spark-submit, i.e. the pip pyspark's Spark)
# Delta comes from the jars scripts/setup.sh fetched into .cache/jars (--jars), else from Maven (--packages).
# Every executor needs the same pinned dependencies (pyproject.toml) in its Python: the image of
# infra/Dockerfile, or an environment on every node named by PYSPARK_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
master=$1; config=$2; shift 2
job=${CSO_JOB:-jobs/pipeline.py}
if [ -z "${SPARK_HOME:-}" ] && [ -z "${SPARK_SUBMIT:-}" ]; then  # pip's pyspark: its own Spark
  SPARK_HOME=$(.venv/bin/python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')
  export SPARK_HOME
fi
properties=${CSO_PROPERTIES:-infra/spark/standalone.conf}
# The driver runs here, in this checkout's environment; the executors' Python is PYSPARK_PYTHON (or
# spark.pyspark.python), which must exist on every worker.
export PYSPARK_DRIVER_PYTHON=${PYSPARK_DRIVER_PYTHON:-$PWD/.venv/bin/python}
py_files=${CSO_PY_FILES:-}
if [ -z "$py_files" ]; then
  .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w dist .
  py_files=$(ls -t dist/cso-*.whl | head -1)
fi
jars=$(ls .cache/jars/*.jar 2>/dev/null | paste -sd, - || true)
if [ -n "$jars" ]; then delta=(--jars "$jars"); else delta=(--packages io.delta:delta-spark_2.13:4.0.1); fi
# shellcheck disable=SC2206  # CSO_SUBMIT_ARGS is a list of words on purpose
extra=(${CSO_SUBMIT_ARGS:-})
exec "${SPARK_SUBMIT:-.venv/bin/spark-submit}" \
  --master "$master" \
  --properties-file "$properties" \
  "${delta[@]}" \
  "${extra[@]}" \
  --py-files "$py_files" \
  "$job" --config "$config" "$@"
