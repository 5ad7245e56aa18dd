"""Webhook deliveries over real HTTP: ``POST /v1/triggers/{id}/webhooks`` on the API server.

Payloads are composed from GitHub's and GitLab's documented formats (see test_webhooks.py);
secrets come from the controller's environment or from a Nomad variable on a real dev agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_webhooks import GITHUB_PUSH, GITLAB_PUSH

from nomad_pipeline.controller.admission import ensure_default_namespace
from nomad_pipeline.controller.api import triggerhooks
from nomad_pipeline.controller.api.app import build_api, start_api
from nomad_pipeline.controller.secrets import SecretResolver
from nomad_pipeline.devagent.server import DevAgent, DevAgentConfig
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.resources.kinds import Flow, Run, Trigger
from nomad_pipeline.store.memory import MemoryStore

SECRET = "s3cret-for-tests"
TRIGGER_LABEL = "nomad-pipeline.io/trigger"


@dataclass
class Hooks:
    address: str
    store: MemoryStore
    http: aiohttp.ClientSession
    secret_env: str

    async def add_trigger(self, name: str, **webhook: Any) -> None:
        source = {"provider": "github", "secret": {"from_env": self.secret_env}, **webhook}
        await self.store.create(
            Trigger.model_validate(
                {
                    "kind": "Trigger",
                    "metadata": {"name": name, "namespace": "default"},
                    "spec": {"flow": "build", "source": {"webhook": source}},
                }
            )
        )

    async def post(
        self, trigger: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        async with self.http.post(
            f"{self.address}/v1/triggers/{trigger}/webhooks",
            data=body,
            headers={"Content-Type": "application/json", **headers},
        ) as response:
            return response.status, await response.json(content_type=None)

    async def runs(self, trigger: str) -> list[Run]:
        return (await self.store.list(Run, "default", selector={TRIGGER_LABEL: trigger})).items


def github(
    payload: dict[str, Any],
    *,
    event: str = "push",
    secret: str | None = SECRET,
    delivery: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4())}
    if secret is not None:
        digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers["X-Hub-Signature-256"] = f"sha256={digest}"
    return body, headers


def gitlab(
    payload: dict[str, Any], *, token: str | None = SECRET, event: str = "Push Hook"
) -> tuple[bytes, dict[str, str]]:
    headers = {"X-Gitlab-Event": event, "X-Gitlab-Event-UUID": str(uuid.uuid4())}
    if token is not None:
        headers["X-Gitlab-Token"] = token
    return json.dumps(payload).encode(), headers


BUILD_FLOW: dict[str, Any] = {
    "kind": "Flow",
    "metadata": {"name": "build", "namespace": "default"},
    "spec": {"inline": {"steps": [{"name": "a", "run": "echo ${trigger.git_sha}"}]}},
}


async def serve_hooks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nomad: NomadClient | None = None
) -> AsyncIterator[Hooks]:
    secret_env = f"NP_TEST_WEBHOOK_SECRET_{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.setenv(secret_env, SECRET)
    store = MemoryStore()
    await store.start()
    await ensure_default_namespace(store)
    await store.create(Flow.model_validate(BUILD_FLOW))
    api = build_api(
        store,
        log_root=tmp_path / "logs",
        extra_routes=[
            triggerhooks.secret_resolver_setup(SecretResolver(nomad)),
            triggerhooks.setup,
        ],
    )
    server = await start_api(api, shutdown_timeout=2.0)
    try:
        async with aiohttp.ClientSession() as http:
            yield Hooks(server.address, store, http, secret_env)
    finally:
        await server.stop()
        await store.close()


@pytest.fixture
async def hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Hooks]:
    async for running in serve_hooks(tmp_path, monkeypatch):
        yield running


async def test_a_signed_github_push_starts_one_run_with_the_trigger_variables(
    hooks: Hooks,
) -> None:
    await hooks.add_trigger("on-push", repository="jrasell/terraform-provider-nomad")
    body, headers = github(GITHUB_PUSH)

    status, answer = await hooks.post("on-push", body, headers)

    assert status == 201, answer
    runs = await hooks.runs("on-push")
    assert [run.metadata.name for run in runs] == [answer["run"]]
    run = runs[0]
    assert run.spec.flow == "build"
    assert run.spec.trigger.type == "webhook"
    assert run.spec.trigger.name == "on-push"
    assert run.spec.trigger.event == "push"
    assert run.spec.trigger.delivery_id == headers["X-GitHub-Delivery"]
    assert run.metadata.labels[TRIGGER_LABEL] == "on-push"
    variables = run.spec.variables
    assert variables["trigger.git_ref"] == "refs/heads/main"
    assert variables["trigger.git_sha"] == GITHUB_PUSH["after"]
    assert variables["trigger.git_before"] == GITHUB_PUSH["before"]
    assert variables["trigger.git_repository"] == "jrasell/terraform-provider-nomad"
    assert variables["trigger.git_commit_message"] == "$(touch /tmp/pwned) fix build"
    assert variables["trigger.git_commit_author"] == "The Octocat"
    assert variables["trigger.git_pusher"] == "octocat"
    assert variables["trigger.git_repo_owner"] == "jrasell"


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("not-the-secret", "X-Hub-Signature-256 does not match"),
        (None, "missing X-Hub-Signature-256 header"),
    ],
)
async def test_a_bad_or_missing_signature_is_401_and_nothing_happens(
    hooks: Hooks, secret: str | None, message: str
) -> None:
    await hooks.add_trigger("on-push")
    before = await hooks.store.get(Trigger, "default", "on-push")
    body, headers = github(GITHUB_PUSH, secret=secret)

    status, answer = await hooks.post("on-push", body, headers)

    assert status == 401, answer
    assert message in answer["error"]["message"]
    assert SECRET not in json.dumps(answer)
    assert await hooks.runs("on-push") == []
    after = await hooks.store.get(Trigger, "default", "on-push")
    assert after.metadata.resource_version == before.metadata.resource_version


async def test_a_replayed_delivery_starts_no_second_run(hooks: Hooks) -> None:
    await hooks.add_trigger("on-push")
    body, headers = github(GITHUB_PUSH)

    first_status, first = await hooks.post("on-push", body, headers)
    again_status, again = await hooks.post("on-push", body, headers)
    # Concurrent copies of one more delivery: still one run for it.
    body2, headers2 = github(GITHUB_PUSH)
    copies = await asyncio.gather(*(hooks.post("on-push", body2, headers2) for _ in range(5)))

    assert (first_status, again_status) == (201, 200)
    assert again == first
    assert sorted(status for status, _ in copies) == [200, 200, 200, 200, 201]
    assert len({answer["run"] for _, answer in copies}) == 1
    runs = await hooks.runs("on-push")
    assert sorted(run.metadata.name for run in runs) == sorted([first["run"], copies[0][1]["run"]])


async def test_filtered_branch_and_unwanted_events_are_ignored_with_202(hooks: Hooks) -> None:
    await hooks.add_trigger("releases", branches=["release/*"], events=["push"])
    pushes_to_main = github(GITHUB_PUSH)
    ping = github({"zen": "Design for failure.", "hook_id": 1}, event="ping")
    pull = github({"action": "opened", "number": 1, "pull_request": {}}, event="pull_request")

    answers = [await hooks.post("releases", *delivery) for delivery in (pushes_to_main, ping, pull)]

    assert [status for status, _ in answers] == [202, 202, 202]
    assert all(set(answer) == {"ignored"} for _, answer in answers)
    assert "main" in answers[0][1]["ignored"]
    assert await hooks.runs("releases") == []

    release = dict(GITHUB_PUSH, ref="refs/heads/release/1.0")
    status, answer = await hooks.post("releases", *github(release))
    assert status == 201, answer


async def test_a_body_over_5_mb_is_413(hooks: Hooks) -> None:
    await hooks.add_trigger("on-push")
    payload = dict(GITHUB_PUSH, padding="x" * (5 * 1024 * 1024))
    status, answer = await hooks.post("on-push", *github(payload))
    assert status == 413, answer
    assert await hooks.runs("on-push") == []


async def test_an_unknown_trigger_is_404(hooks: Hooks) -> None:
    status, answer = await hooks.post("nope", *github(GITHUB_PUSH))
    assert status == 404, answer
    assert answer["error"]["reason"] == "NotFound"


async def test_gitlab_push_with_the_token_starts_a_run_and_a_wrong_token_is_401(
    hooks: Hooks,
) -> None:
    await hooks.add_trigger("gl", provider="gitlab", branches=["develop"])

    bad_status, _ = await hooks.post("gl", *gitlab(GITLAB_PUSH, token="wrong"))
    missing_status, _ = await hooks.post("gl", *gitlab(GITLAB_PUSH, token=None))
    assert (bad_status, missing_status) == (401, 401)
    assert await hooks.runs("gl") == []

    status, answer = await hooks.post("gl", *gitlab(GITLAB_PUSH))
    assert status == 201, answer
    (run,) = await hooks.runs("gl")
    assert run.spec.variables["trigger.git_sha"] == "bbbb"
    assert run.spec.variables["trigger.git_commit_message"] == "fixed readme"
    assert run.spec.variables["trigger.git_repository"] == "mike/diaspora"

    merge = {"object_attributes": {"target_branch": "develop", "action": "open"}}
    status, answer = await hooks.post("gl", *gitlab(merge, event="Merge Request Hook"))
    assert (status, set(answer)) == (202, {"ignored"})


async def test_the_answer_comes_in_under_100_ms(hooks: Hooks) -> None:
    await hooks.add_trigger("on-push")
    await hooks.post("on-push", *github(GITHUB_PUSH))  # warm up the connection
    took: list[float] = []
    for _ in range(20):
        body, headers = github(GITHUB_PUSH)
        started = time.perf_counter()
        status, _ = await hooks.post("on-push", body, headers)
        took.append(time.perf_counter() - started)
        assert status == 201
    took.sort()
    assert took[len(took) // 2] < 0.1, took


async def test_a_secret_from_a_nomad_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = DevAgent(DevAgentConfig(port=0))
    address = await agent.start()
    try:
        async with NomadClient(address) as nomad:
            await nomad.put_variable("webhooks/github", {"secret": SECRET})
            async for hooks in serve_hooks(tmp_path, monkeypatch, nomad):
                await hooks.add_trigger(
                    "from-var",
                    secret={"from_nomad_variable": {"path": "webhooks/github", "key": "secret"}},
                )
                await hooks.add_trigger(
                    "missing-var",
                    secret={"from_nomad_variable": {"path": "webhooks/none", "key": "secret"}},
                )
                status, answer = await hooks.post("from-var", *github(GITHUB_PUSH))
                assert status == 201, answer
                status, answer = await hooks.post("from-var", *github(GITHUB_PUSH, secret="x"))
                assert status == 401, answer
                status, answer = await hooks.post("missing-var", *github(GITHUB_PUSH))
                assert status == 400, answer
                assert "webhooks/none" in answer["error"]["message"]
                assert await hooks.runs("missing-var") == []
    finally:
        await agent.stop()


async def test_a_generic_delivery_signed_in_a_configured_header(hooks: Hooks) -> None:
    await hooks.add_trigger(
        "generic",
        provider="generic",
        signature_header="X-My-Signature",
        variables={"git_sha": "$.head.sha", "git_commit_message": "head.commits[0].msg"},
    )
    body = json.dumps({"head": {"sha": "abc123", "commits": [{"msg": "deploy it"}]}}).encode()
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()

    status, answer = await hooks.post(
        "generic", body, {"X-My-Signature": f"sha256={digest}", "X-Delivery-ID": "g-1"}
    )
    assert status == 201, answer
    replay_status, replay = await hooks.post(
        "generic", body, {"X-My-Signature": digest, "X-Delivery-ID": "g-1"}
    )
    assert (replay_status, replay) == (200, answer)
    wrong_header, _ = await hooks.post("generic", body, {"X-Signature-256": digest})
    assert wrong_header == 401

    (run,) = await hooks.runs("generic")
    assert run.spec.variables["trigger.git_sha"] == "abc123"
    assert run.spec.variables["trigger.git_commit_message"] == "deploy it"
    assert run.spec.trigger.delivery_id == "g-1"
