#!/usr/bin/env bash
# Submit the whole pipeline to a Spark standalone (or YARN: --master yarn) cluster.
#   infra/submit-standalone.sh spark://master:7077 infra/cluster.example.yaml [--set key=value ...]
# The package travels as a wheel (--py-files); every executor needs the same pinned dependencies
# (pyspark, delta-spark, pyarrow, orjson, pydantic, ...) in its Python: build an environment or image from
# pyproject.toml and point PYSPARK_PYTHON at it.
set -euo pipefail
cd "$(dirname "$0")/.."
master=$1; config=$2; shift 2
.venv/bin/python -m pip wheel -q --no-deps -w dist .
wheel=$(ls -t dist/cso-*.whl | head -1)
exec .venv/bin/spark-submit \
  --master "$master" \
  --packages io.delta:delta-spark_2.13:4.0.1 \
  --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension \
  --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog \
  --py-files "$wheel" \
  jobs/pipeline.py --config "$config" "$@"
