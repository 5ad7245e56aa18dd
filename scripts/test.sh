#!/usr/bin/env bash
# Sets up the virtualenv, then runs the whole check: lint, format, types, import layering, and
# the test suite in parallel. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
mypy
lint-imports
exec pytest -n "${PYTEST_WORKERS:-auto}" "$@"
