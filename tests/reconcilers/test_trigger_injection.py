"""The injection test through a webhook's commit message, end to end: a signed GitHub push on the
full controller (webhook route, run reconciler, runner, dev agent) starts a real run whose steps
print the commit message; the run succeeds, the log shows the literal text, nothing ran."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from run_harness import Stack
from test_run_injection import HCL_JOBSPEC

from nomad_pipeline.resources.kinds import Run, Trigger

SECRET = "injection-test-secret"
# The runs issue's jobspec, printing the trigger's environment variable and its argument.
TRIGGER_JOBSPEC = HCL_JOBSPEC.replace("NP_VAR_MSG", "NP_TRIGGER_GIT_COMMIT_MESSAGE")


def hostile_messages(marker: Path) -> list[str]:
    return [f"$(touch {marker})", f"'; touch {marker}; '"]


def push(message: str) -> dict[str, Any]:
    return {
        "ref": "refs/heads/main",
        "before": "1" * 40,
        "after": "2" * 40,
        "repository": {
            "name": "app",
            "full_name": "acme/app",
            "owner": {"login": "acme"},
            "clone_url": "https://example.com/acme/app.git",
        },
        "pusher": {"name": "mallory"},
        "head_commit": {"id": "2" * 40, "message": message, "author": {"name": "Mallory"}},
        "commits": [],
    }


async def deliver(stack: Stack, trigger: str, message: str) -> str:
    body = json.dumps(push(message)).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    async with stack.http.post(
        f"{stack.address}/v1/triggers/{trigger}/webhooks",
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": f"sha256={signature}",
        },
    ) as response:
        answer = await response.json()
        assert response.status == 201, answer
        run: str = answer["run"]
        return run


async def add_trigger(stack: Stack, name: str, flow: str, secret_env: str) -> None:
    await stack.app.store.create(
        Trigger.model_validate(
            {
                "kind": "Trigger",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {
                    "flow": flow,
                    "source": {
                        "webhook": {"provider": "github", "secret": {"from_env": secret_env}}
                    },
                },
            }
        )
    )


def log_of(stack: Stack, run_id: str, step: str) -> Path:
    return stack.data_dir / "logs" / "runs" / "default" / run_id / step / "logs" / "stdout.log"


def log_holds(log: Path, text: str) -> Callable[[Run], bool]:
    """A wait condition: the step's log file holds exactly ``text`` (logs arrive after the run
    ends)."""
    return lambda _run: log.exists() and log.read_text() == text


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"NP_TEST_HOOK_{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.setenv(name, SECRET)
    return name


async def test_a_hostile_commit_message_reaches_an_inline_flow_as_data(
    stack: Stack, secret_env: str
) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    await stack.create_flow(
        "echo-inline",
        {
            "inline": {
                "steps": [
                    {"name": "tpl", "run": 'echo "tpl=${var.trigger.git_commit_message}"'},
                    {"name": "env", "run": 'printf "env=%s\\n" "$NP_TRIGGER_GIT_COMMIT_MESSAGE"'},
                ]
            }
        },
    )
    await add_trigger(stack, "inline-hook", "echo-inline", secret_env)
    for message in hostile_messages(marker):
        run_id = await deliver(stack, "inline-hook", message)
        run = await stack.wait_run(run_id)
        assert run.status.phase == "success", run.status
        assert run.spec.trigger.name == "inline-hook"
        expected = {"tpl": f"tpl={message}\n", "env": f"env={message}\n"}
        for step, text in expected.items():
            log = log_of(stack, run_id, step)
            await stack.wait_run(
                run_id,
                until=log_holds(log, text),
            )
    assert not marker.exists()


async def test_a_hostile_commit_message_reaches_a_specification_flow_as_data(
    stack: Stack, secret_env: str
) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    await stack.create_flow(
        "echo-spec",
        {
            "specification": {
                "steps": [
                    {
                        "name": "echo",
                        "job": {
                            "hcl": TRIGGER_JOBSPEC,
                            "variables": {"msg": "${var.trigger.git_commit_message}"},
                        },
                    }
                ]
            }
        },
    )
    await add_trigger(stack, "spec-hook", "echo-spec", secret_env)
    for message in hostile_messages(marker):
        run_id = await deliver(stack, "spec-hook", message)
        run = await stack.wait_run(run_id)
        assert run.status.phase == "success", run.status
        log = log_of(stack, run_id, "echo")
        expected = f"env={message}\narg={message}\n"
        await stack.wait_run(
            run_id,
            until=log_holds(log, expected),
        )
    assert not marker.exists()
