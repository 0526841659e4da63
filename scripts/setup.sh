#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for parafold: the search binaries from Debian's packages
# and a virtual environment in .venv with parafold and its test tools. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for bin in jackhmmer hmmsearch hhblits hhsearch kalign mmseqs; do
  command -v "$bin" >/dev/null 2>&1 || need_apt=1
done
# chromium + chromium-driver: the report's browser test (headless, software WebGL).
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || need_apt=1
# gcc: the shared-file-system test builds a small LD_PRELOAD library (a mount without locks).
command -v gcc >/dev/null 2>&1 || need_apt=1
if [ "$need_apt" = 1 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq hmmer hhsuite mmseqs2 kalign \
    chromium chromium-driver gcc libc6-dev >/dev/null
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
echo "parafold is set up: .venv/bin/parafold --help"
