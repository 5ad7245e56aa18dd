"""Nomad JSON jobspecs for tests: a raw_exec batch job running a shell script.

Importable from every test folder, like ``ports.py``.
"""

from __future__ import annotations

from typing import Any


def shell_job(script: str, name: str = "job") -> dict[str, Any]:
    """A raw_exec JSON jobspec running ``script`` with /bin/sh."""
    return {
        "ID": name,
        "Type": "batch",
        "TaskGroups": [
            {
                "Name": "step",
                "Tasks": [
                    {
                        "Name": "main",
                        "Driver": "raw_exec",
                        "Config": {"command": "/bin/sh", "args": ["-c", script]},
                    }
                ],
            }
        ],
    }
