"""Webhook authentication and payload parsing, with payloads composed from the providers' docs."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from nomad_pipeline.controller import webhooks
from nomad_pipeline.errors import Invalid, Unauthorized

SECRET = "s3cret"

GITHUB_PUSH: dict[str, Any] = {
    "ref": "refs/heads/main",
    "before": "1111111111111111111111111111111111111111",
    "after": "2222222222222222222222222222222222222222",
    "repository": {
        "name": "terraform-provider-nomad",
        "full_name": "jrasell/terraform-provider-nomad",
        "owner": {"login": "jrasell", "name": "jrasell"},
        "html_url": "https://github.com/jrasell/terraform-provider-nomad",
        "clone_url": "https://github.com/jrasell/terraform-provider-nomad.git",
    },
    "pusher": {"name": "octocat", "email": "octocat@example.com"},
    "head_commit": {
        "id": "2222222222222222222222222222222222222222",
        "message": "$(touch /tmp/pwned) fix build",
        "url": "https://github.com/jrasell/terraform-provider-nomad/commit/2222222",
        "author": {"name": "The Octocat", "email": "octocat@example.com"},
    },
    "commits": [{"added": ["docs/a.md"], "modified": ["src/main.go"], "removed": []}],
}

GITLAB_PUSH: dict[str, Any] = {
    "object_kind": "push",
    "ref": "refs/heads/develop",
    "before": "aaaa",
    "after": "bbbb",
    "checkout_sha": "bbbb",
    "user_username": "jsmith",
    "project": {
        "name": "Diaspora",
        "namespace": "Mike",
        "path_with_namespace": "mike/diaspora",
        "web_url": "http://example.com/mike/diaspora",
        "git_http_url": "http://example.com/mike/diaspora.git",
    },
    "commits": [
        {"id": "aaaa", "message": "older", "url": "u1", "author": {"name": "A"}},
        {
            "id": "bbbb",
            "message": "fixed readme",
            "url": "http://example.com/mike/diaspora/commit/bbbb",
            "author": {"name": "GitLab dev"},
            "modified": ["README.md"],
        },
    ],
}


def github_headers(body: bytes, event: str = "push", secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "X-Hub-Signature-256": f"sha256={digest}",
    }


def test_github_push_fills_the_seed_trigger_variables() -> None:
    body = json.dumps(GITHUB_PUSH).encode()
    headers = github_headers(body)
    webhooks.verify("github", secret=SECRET, body=body, headers=headers)
    delivery = webhooks.parse("github", body=body, headers=headers)
    assert delivery.event == "push"
    assert delivery.branch == "main"
    assert delivery.delivery_id == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert delivery.variables == {
        "git_ref": "refs/heads/main",
        "git_sha": "2222222222222222222222222222222222222222",
        "git_before": "1111111111111111111111111111111111111111",
        "git_repository": "jrasell/terraform-provider-nomad",
        "git_pusher": "octocat",
        "git_repo_name": "terraform-provider-nomad",
        "git_repo_owner": "jrasell",
        "git_repo_url": "https://github.com/jrasell/terraform-provider-nomad.git",
        "git_commit_message": "$(touch /tmp/pwned) fix build",
        "git_commit_author": "The Octocat",
        "git_commit_url": "https://github.com/jrasell/terraform-provider-nomad/commit/2222222",
    }
    assert delivery.changed_paths == ("docs/a.md", "src/main.go")


def test_github_tag_push_is_its_own_event() -> None:
    body = json.dumps({**GITHUB_PUSH, "ref": "refs/tags/v1.2.0"}).encode()
    delivery = webhooks.parse("github", body=body, headers=github_headers(body))
    assert delivery.event == "tag"
    assert delivery.branch is None


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-GitHub-Event": "push"}, "missing X-Hub-Signature-256"),
        ({"X-Hub-Signature-256": "sha256=00"}, "does not match"),
        ({"X-Hub-Signature-256": "deadbeef"}, "does not match"),
    ],
)
def test_github_bad_or_missing_signature_is_unauthorized(
    headers: dict[str, str], message: str
) -> None:
    with pytest.raises(Unauthorized, match=message):
        webhooks.verify("github", secret=SECRET, body=b"{}", headers=headers)


def test_github_signature_with_another_secret_is_unauthorized() -> None:
    body = json.dumps(GITHUB_PUSH).encode()
    with pytest.raises(Unauthorized):
        webhooks.verify(
            "github", secret=SECRET, body=body, headers=github_headers(body, secret="other")
        )


def test_gitlab_token_and_push() -> None:
    body = json.dumps(GITLAB_PUSH).encode()
    headers = {
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Token": SECRET,
        "X-Gitlab-Event-UUID": "u-1",
    }
    webhooks.verify("gitlab", secret=SECRET, body=body, headers=headers)
    delivery = webhooks.parse("gitlab", body=body, headers=headers)
    assert delivery.event == "push"
    assert delivery.delivery_id == "u-1"
    assert delivery.variables["git_sha"] == "bbbb"
    assert delivery.variables["git_commit_message"] == "fixed readme"
    assert delivery.variables["git_repository"] == "mike/diaspora"
    assert delivery.variables["git_pusher"] == "jsmith"
    with pytest.raises(Unauthorized, match="X-Gitlab-Token does not match"):
        webhooks.verify("gitlab", secret=SECRET, body=body, headers={"X-Gitlab-Token": "no"})


def test_generic_extracts_variables_by_path() -> None:
    body = json.dumps({"head": {"sha": "abc", "commits": [{"msg": "hi"}]}, "n": 3}).encode()
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-My-Sig": digest, "X-Delivery-ID": "d1"}
    webhooks.verify(
        "generic", secret=SECRET, body=body, headers=headers, signature_header="X-My-Sig"
    )
    delivery = webhooks.parse(
        "generic",
        body=body,
        headers=headers,
        variable_paths={"git_sha": "$.head.sha", "message": "head.commits[0].msg", "n": "$.n"},
    )
    assert delivery.variables == {"git_sha": "abc", "message": "hi", "n": "3"}


@pytest.mark.parametrize(
    ("events", "branches", "paths", "reason"),
    [
        (["push"], [], [], None),
        (["pull_request"], [], [], "event 'push' is not one of"),
        (["push"], ["release/*"], [], "branch 'main' does not match"),
        (["push"], ["ma*"], [], None),
        (["push"], [], ["src/*"], None),
        (["push"], [], ["charts/*"], "no changed path matches"),
    ],
)
def test_filters(
    events: list[str], branches: list[str], paths: list[str], reason: str | None
) -> None:
    body = json.dumps(GITHUB_PUSH).encode()
    delivery = webhooks.parse("github", body=body, headers=github_headers(body))
    got = webhooks.ignore_reason(
        delivery,
        repository="jrasell/terraform-provider-nomad",
        events=events,
        branches=branches,
        paths=paths,
    )
    assert (got is None) if reason is None else (got is not None and got.startswith(reason))


def test_malformed_body_is_invalid() -> None:
    with pytest.raises(Invalid, match="not JSON"):
        webhooks.parse("github", body=b"{nope", headers={"X-GitHub-Event": "push"})
