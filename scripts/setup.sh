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
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip check

mkdir -p .cache/jars
for artifact in "io.delta:delta-spark_2.13:${DELTA_VERSION}" "io.delta:delta-storage:${DELTA_VERSION}"; do
  IFS=: read -r group name version <<<"$artifact"
  jar=".cache/jars/${name}-${version}.jar"
  if [ ! -s "$jar" ]; then
    echo "setup: fetching $artifact from Maven Central"
    mvn -q dependency:copy -Dartifact="$artifact" -DoutputDirectory=.cache/jars >/dev/null
  fi
done
echo "setup: done (.venv ready, Delta jars in .cache/jars)"
