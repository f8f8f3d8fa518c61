#!/usr/bin/env bash
# Spark GPU discovery script: prints the GPUs this executor may use as Spark's ResourceInformation JSON,
#   {"name": "gpu", "addresses": ["0", "1"]}
# Set it with spark.executor.resource.gpu.discoveryScript (or rollouts.gpu_discovery_script for the rollout
# stage's own ResourceProfile). Addresses are the GPU indexes nvidia-smi reports: inside a container (Kubernetes,
# YARN with Docker) only the GPUs the runtime mounted, numbered from 0. An executor started with
# CUDA_VISIBLE_DEVICES=<indexes> (a bare-metal scheduler's share) offers only those. A task uses its address as
# CUDA_VISIBLE_DEVICES. No GPU: an empty list, and Spark then refuses to start an executor that asked for one.
set -euo pipefail
name=${SPARK_RESOURCE_NAME:-gpu}
addresses=()
if command -v nvidia-smi >/dev/null 2>&1; then
  while IFS= read -r idx; do
    idx=${idx//[[:space:]]/}
    [ -n "$idx" ] && addresses+=("$idx")
  done < <(nvidia-smi --query-gpu=index --format=csv,noheader)
fi
visible=${CUDA_VISIBLE_DEVICES:-}
if [[ "$visible" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  kept=()
  IFS=, read -ra wanted <<<"$visible"
  for a in "${addresses[@]}"; do
    for w in "${wanted[@]}"; do
      [ "$a" = "$w" ] && kept+=("$a")
    done
  done
  addresses=("${kept[@]}")
fi
json=""
for a in "${addresses[@]}"; do
  json+="${json:+, }\"$a\""
done
printf '{"name": "%s", "addresses": [%s]}\n' "$name" "$json"
