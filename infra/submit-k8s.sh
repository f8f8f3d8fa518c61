#!/usr/bin/env bash
# Submit a cso job (default: the whole pipeline) to Kubernetes in cluster mode, image from infra/Dockerfile.
#   infra/submit-k8s.sh https://k8s-api:6443 [--set key=value ...] [--run-id RUN]
# Before the first run:
#   kubectl create namespace cso && kubectl -n cso create serviceaccount cso-spark
#   kubectl -n cso create rolebinding cso-spark --clusterrole=edit --serviceaccount=cso:cso-spark
#   kubectl -n cso create configmap cso-config --from-file=cso.yaml=infra/k8s.yaml
#   kubectl -n cso create secret generic cso-model-keys --from-literal=openai=... --from-literal=anthropic=...
# The code and the Delta jars are in the image (local:// paths); the config comes from the ConfigMap.
# CSO_JOB picks another entry point (e.g. jobs/housekeeping.py); CSO_SUBMIT_ARGS adds spark-submit arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
api=$1; shift
job=${CSO_JOB:-jobs/pipeline.py}
# shellcheck disable=SC2206
extra=(${CSO_SUBMIT_ARGS:-})
exec "${SPARK_SUBMIT:-spark-submit}" \
  --master "k8s://$api" \
  --deploy-mode cluster \
  --name "cso-$(basename "$job" .py)" \
  --properties-file infra/spark/k8s.conf \
  "${extra[@]}" \
  "local:///opt/cso/$job" --config /etc/cso/cso.yaml "$@"
