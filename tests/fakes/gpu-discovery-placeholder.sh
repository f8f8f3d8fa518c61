#!/usr/bin/env bash
# A Spark GPU discovery script for CPU-only test clusters: reports CSO_PLACEHOLDER_GPUS (default 1) placeholder
# addresses "0".."N-1" as {"name": "gpu", "addresses": [...]}, so stage-level scheduling (the rollout stage's GPU
# ResourceProfile) is exercised on a local-cluster without GPUs (tests/gpu_pool_checks.py). The addresses are
# labels only; nothing is put on a device. On real GPU machines use infra/gpu-discovery.sh (nvidia-smi).
set -euo pipefail
n=${CSO_PLACEHOLDER_GPUS:-1}
json=""
for ((i = 0; i < n; i++)); do
  json+="${json:+, }\"$i\""
done
printf '{"name": "gpu", "addresses": [%s]}\n' "$json"
