"""Rendering the runner job of an inline flow (pure, no I/O).

One batch job per run executes every inline step: ``nomad-pipeline-runner`` fetches the run's
plan from the controller and reports step transitions and logs back (``runner/main.py`` reads
its configuration from the ``NP_*`` variables set here). The job:

- has the deterministic ID ``<inline.job_id or flow>-<run>`` (the seed's ``inline "<job-id>"``
  label is the prefix), so a restarted controller finds it instead of registering it again;
- runs with ``raw_exec`` the host's runner (the ``nomad-pipeline-runner`` executable next to
  the controller's Python, else ``python -m nomad_pipeline.runner``), or with ``docker``/``exec``
  the ``nomad-pipeline-runner`` inside the flow's image;
- authenticates with the run's token (``controller/runnertoken.py``), passed in ``NP_RUN_TOKEN``;
- never restarts or reschedules (a runner that dies fails the run with Nomad's reason; step
  retries are the runner's business);
- carries the flow's artifacts (source, destination and options are templates rendered here:
  they are go-getter parameters, not shell) and resources.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nomad_pipeline.reconcilers.specjobs import (
    META_ATTEMPT,
    META_NAMESPACE,
    META_RUN,
    META_STEP,
    RESCHEDULE_NEVER,
    RESTART_FAIL_FAST,
)
from nomad_pipeline.resources.kinds import InlineSpec
from nomad_pipeline.resources.templates import render

RUNNER_EXECUTABLE = "nomad-pipeline-runner"
RUNNER_TASK = "runner"
RUNNER_GROUP = "runner"
# The Meta step value of a runner job: it runs every step of the run.
RUNNER_META_STEP = "*"

ENV_CONTROLLER_ADDR = "NP_CONTROLLER_ADDR"
ENV_RUN_NAMESPACE = "NP_RUN_NAMESPACE"
ENV_RUN_NAME = "NP_RUN_NAME"
ENV_RUN_TOKEN = "NP_RUN_TOKEN"


def host_runner_command() -> list[str]:
    """How ``raw_exec`` starts the runner on this host: the console script installed beside the
    controller's interpreter, else on PATH, else ``python -m nomad_pipeline.runner``."""
    beside = Path(sys.executable).parent / RUNNER_EXECUTABLE
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(RUNNER_EXECUTABLE)
    if found:
        return [found]
    return [sys.executable, "-m", "nomad_pipeline.runner"]


def runner_job_id(inline: InlineSpec, flow: str, run: str) -> str:
    return f"{inline.job_id or flow}-{run}"


def render_runner_job(
    inline: InlineSpec,
    *,
    job_id: str,
    namespace: str,
    run: str,
    controller_address: str,
    token: str,
    context: Mapping[str, Any],
    env: Mapping[str, str],
    host_command: Sequence[str],
) -> dict[str, Any]:
    """The runner's Nomad job for one run (``context`` renders the artifacts' templates)."""
    runner = inline.runner
    if runner.driver == "raw_exec":
        config: dict[str, Any] = {"command": host_command[0], "args": list(host_command[1:])}
    elif runner.driver == "docker":
        config = {"image": runner.image, "command": RUNNER_EXECUTABLE}
    else:
        config = {"command": RUNNER_EXECUTABLE}
    artifacts = [
        {
            "GetterSource": render(artifact.source, context),
            "RelativeDest": render(artifact.destination, context),
            "GetterOptions": {
                key: render(value, context) for key, value in sorted(artifact.options.items())
            },
        }
        for artifact in runner.artifacts
    ]
    task: dict[str, Any] = {
        "Name": RUNNER_TASK,
        "Driver": runner.driver,
        "Config": config,
        "Env": {
            **env,
            ENV_CONTROLLER_ADDR: controller_address,
            ENV_RUN_NAMESPACE: namespace,
            ENV_RUN_NAME: run,
            ENV_RUN_TOKEN: token,
        },
        "Resources": {"CPU": runner.resources.cpu, "MemoryMB": runner.resources.memory},
        # The runner stops its steps and flushes its last reports on SIGTERM.
        "KillTimeout": 10 * 10**9,
    }
    if artifacts:
        task["Artifacts"] = artifacts
    return {
        "ID": job_id,
        "Name": job_id,
        "Type": "batch",
        "Namespace": runner.namespace,
        "Meta": {
            META_RUN: run,
            META_NAMESPACE: namespace,
            META_STEP: RUNNER_META_STEP,
            META_ATTEMPT: "1",
        },
        "TaskGroups": [
            {
                "Name": RUNNER_GROUP,
                "Count": 1,
                "RestartPolicy": dict(RESTART_FAIL_FAST),
                "ReschedulePolicy": dict(RESCHEDULE_NEVER),
                "Tasks": [task],
            }
        ],
    }
