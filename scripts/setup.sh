#!/usr/bin/env bash
# Creates .venv and installs nomad-pipeline with every dependency from pyproject.toml.
# Sourced by demo.sh and test.sh; safe to run again (it only installs what changed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v git >/dev/null 2>&1; then
    # Artifacts (git:: URLs), git triggers and GitOps sync use the git CLI.
    apt-get update -q && apt-get install -y -q git
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
