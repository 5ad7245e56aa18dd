#!/usr/bin/env bash
# Sets up a virtualenv with every dependency from pyproject.toml, then runs the whole check:
# lint, format, types, import layering, and the test suite (in parallel).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v git >/dev/null 2>&1; then
    apt-get update -q && apt-get install -y -q git
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
mypy
lint-imports
exec pytest -n "${PYTEST_WORKERS:-auto}" "$@"
