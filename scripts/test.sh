#!/usr/bin/env bash
# The test command of README.md: the system packages the tests need (scripts/system-packages.sh: installed
# when missing, as root or through sudo; CPC_NO_APT=1 installs nothing), set up .venv if needed, lint, then
# the whole suite. Skipped tests are listed with their reasons.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-packages.sh
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -rs -p no:cacheprovider "$@"
