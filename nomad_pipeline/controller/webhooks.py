"""Git webhook deliveries: authenticate them and turn them into trigger variables.

Pure (no I/O): the HTTP route reads the body and headers, resolves the secret, and calls
:func:`verify` then :func:`parse`. Every provider's push fills the seed's ``trigger.*`` variables
(git_ref, git_sha, git_before, git_repository, git_pusher, git_repo_name, git_repo_owner,
git_repo_url, git_commit_message, git_commit_author, git_commit_url) so a flow works with any of
them. Values are data: they reach steps as environment variables, never as shell source.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

from nomad_pipeline.errors import Invalid, Unauthorized
from nomad_pipeline.resources.jsonpath import extract

Provider = Literal["github", "gitlab", "generic"]

# Event names a trigger's `events` list may use, per provider.
GITHUB_EVENTS = ("push", "tag", "pull_request", "ping")
GITLAB_EVENTS = ("push", "tag", "merge_request")
GENERIC_SIGNATURE_HEADER = "X-Signature-256"
GENERIC_DELIVERY_HEADER = "X-Delivery-ID"


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one webhook delivery means, independent of the provider."""

    event: str
    delivery_id: str
    ref: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    changed_paths: tuple[str, ...] = ()

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else None


def _header(headers: Mapping[str, str], name: str) -> str:
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), "")


def _hmac_sha256_matches(secret: str, body: bytes, signature: str) -> bool:
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    given = signature.removeprefix("sha256=").strip().lower()
    return hmac.compare_digest(expected, given)


def verify(
    provider: Provider,
    *,
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    signature_header: str | None = None,
) -> None:
    """Raise Unauthorized unless the delivery proves it knows ``secret``."""
    if provider == "gitlab":
        token = _header(headers, "X-Gitlab-Token")
        if not token:
            raise Unauthorized("missing X-Gitlab-Token header")
        if not hmac.compare_digest(token.encode(), secret.encode()):
            raise Unauthorized("X-Gitlab-Token does not match the trigger's secret")
        return
    header = (
        "X-Hub-Signature-256"
        if provider == "github"
        else (signature_header or GENERIC_SIGNATURE_HEADER)
    )
    signature = _header(headers, header)
    if not signature:
        raise Unauthorized(f"missing {header} header")
    if not _hmac_sha256_matches(secret, body, signature):
        raise Unauthorized(f"{header} does not match the body signed with the trigger's secret")


def _decode(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Invalid(f"webhook body is not JSON: {exc}", field="body") from exc
    if not isinstance(payload, dict):
        raise Invalid("webhook body must be a JSON object", field="body")
    return payload


def _get(data: Any, *path: str | int) -> Any:
    for part in path:
        if isinstance(part, int):
            data = data[part] if isinstance(data, list) and -len(data) <= part < len(data) else None
        else:
            data = data.get(part) if isinstance(data, dict) else None
    return data


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _git_variables(**values: Any) -> dict[str, str]:
    return {f"git_{name}": _text(value) for name, value in values.items()}


def _changed_paths(commits: Any) -> tuple[str, ...]:
    paths: set[str] = set()
    for commit in commits if isinstance(commits, list) else []:
        for kind in ("added", "modified", "removed"):
            paths.update(str(p) for p in (_get(commit, kind) or []))
    return tuple(sorted(paths))


def _parse_github(body: bytes, headers: Mapping[str, str]) -> Delivery:
    event = _header(headers, "X-GitHub-Event")
    delivery_id = _header(headers, "X-GitHub-Delivery")
    if not event:
        raise Invalid("missing X-GitHub-Event header", field="headers.X-GitHub-Event")
    payload = _decode(body)
    repository = _get(payload, "repository") or {}
    common = {
        "repository": _get(repository, "full_name"),
        "repo_name": _get(repository, "name"),
        "repo_owner": _get(repository, "owner", "login") or _get(repository, "owner", "name"),
        "repo_url": _get(repository, "clone_url") or _get(repository, "html_url"),
    }
    if event == "push":
        ref = _text(_get(payload, "ref"))
        head = _get(payload, "head_commit") or {}
        variables = _git_variables(
            ref=ref,
            sha=_get(payload, "after"),
            before=_get(payload, "before"),
            pusher=_get(payload, "pusher", "name"),
            commit_message=_get(head, "message"),
            commit_author=_get(head, "author", "name"),
            commit_url=_get(head, "url"),
            **common,
        )
        kind = "tag" if ref.startswith("refs/tags/") else "push"
        return Delivery(kind, delivery_id, ref, variables, _changed_paths(payload.get("commits")))
    if event == "pull_request":
        pull = _get(payload, "pull_request") or {}
        ref = f"refs/heads/{_text(_get(pull, 'base', 'ref'))}"
        variables = _git_variables(
            ref=ref,
            sha=_get(pull, "head", "sha"),
            before=_get(pull, "base", "sha"),
            pusher=_get(payload, "sender", "login"),
            commit_message=_get(pull, "title"),
            commit_author=_get(pull, "user", "login"),
            commit_url=_get(pull, "html_url"),
            **common,
        )
        variables["pr_action"] = _text(_get(payload, "action"))
        variables["pr_number"] = _text(_get(payload, "number"))
        variables["pr_head_ref"] = _text(_get(pull, "head", "ref"))
        return Delivery("pull_request", delivery_id, ref, variables)
    return Delivery(event, delivery_id)


_GITLAB_EVENTS = {
    "Push Hook": "push",
    "Tag Push Hook": "tag",
    "Merge Request Hook": "merge_request",
}


def _parse_gitlab(body: bytes, headers: Mapping[str, str]) -> Delivery:
    header_event = _header(headers, "X-Gitlab-Event")
    delivery_id = _header(headers, "X-Gitlab-Event-UUID") or _header(
        headers, "X-Gitlab-Webhook-UUID"
    )
    if not header_event:
        raise Invalid("missing X-Gitlab-Event header", field="headers.X-Gitlab-Event")
    event = _GITLAB_EVENTS.get(header_event, header_event)
    payload = _decode(body)
    project = _get(payload, "project") or {}
    common = {
        "repository": _get(project, "path_with_namespace"),
        "repo_name": _get(project, "name"),
        "repo_owner": _get(project, "namespace"),
        "repo_url": _get(project, "git_http_url") or _get(project, "web_url"),
    }
    if event in ("push", "tag"):
        sha = _text(_get(payload, "checkout_sha") or _get(payload, "after"))
        commits = payload.get("commits") or []
        head = next((c for c in commits if _get(c, "id") == sha), None) or _get(commits, -1) or {}
        variables = _git_variables(
            ref=_get(payload, "ref"),
            sha=sha,
            before=_get(payload, "before"),
            pusher=_get(payload, "user_username") or _get(payload, "user_name"),
            commit_message=_get(head, "message"),
            commit_author=_get(head, "author", "name"),
            commit_url=_get(head, "url"),
            **common,
        )
        return Delivery(
            event, delivery_id, _text(_get(payload, "ref")), variables, _changed_paths(commits)
        )
    if event == "merge_request":
        attributes = _get(payload, "object_attributes") or {}
        last = _get(attributes, "last_commit") or {}
        ref = f"refs/heads/{_text(_get(attributes, 'target_branch'))}"
        variables = _git_variables(
            ref=ref,
            sha=_get(last, "id"),
            before="",
            pusher=_get(payload, "user", "username"),
            commit_message=_get(last, "message"),
            commit_author=_get(last, "author", "name"),
            commit_url=_get(last, "url"),
            **common,
        )
        variables["mr_action"] = _text(_get(attributes, "action"))
        variables["mr_source_branch"] = _text(_get(attributes, "source_branch"))
        return Delivery("merge_request", delivery_id, ref, variables)
    return Delivery(event, delivery_id)


def _parse_generic(
    body: bytes, headers: Mapping[str, str], variable_paths: Mapping[str, str]
) -> Delivery:
    payload = _decode(body)
    variables: dict[str, str] = {}
    for name, expression in variable_paths.items():
        value = extract(payload, expression)
        variables[name] = value if isinstance(value, str) else json.dumps(value)
    ref = variables.get("git_ref", "")
    return Delivery("push", _header(headers, GENERIC_DELIVERY_HEADER), ref, variables)


def parse(
    provider: Provider,
    *,
    body: bytes,
    headers: Mapping[str, str],
    variable_paths: Mapping[str, str] | None = None,
) -> Delivery:
    """Turn an authenticated delivery into a :class:`Delivery` (Invalid if malformed)."""
    if provider == "github":
        return _parse_github(body, headers)
    if provider == "gitlab":
        return _parse_gitlab(body, headers)
    return _parse_generic(body, headers, variable_paths or {})


def ignore_reason(
    delivery: Delivery,
    *,
    repository: str | None,
    events: list[str],
    branches: list[str],
    paths: list[str],
) -> str | None:
    """Why a trigger does not want this delivery, or None when it should start a run.

    ``branches`` and ``paths`` accept shell-style globs (``release/*``, ``src/**``).
    """
    if events and delivery.event not in events:
        return f"event {delivery.event!r} is not one of {events}"
    wanted_repo = (repository or "").lower()
    delivered_repo = delivery.variables.get("git_repository", "").lower()
    if wanted_repo and delivered_repo and wanted_repo != delivered_repo:
        return f"repository {delivered_repo!r} is not {wanted_repo!r}"
    branch = delivery.branch
    branch_wanted = branch is not None and any(fnmatchcase(branch, p) for p in branches)
    if branches and delivery.event != "tag" and not branch_wanted:
        return f"branch {branch!r} does not match {branches}"
    changed = delivery.changed_paths
    if paths and changed and not any(fnmatchcase(c, p) for c in changed for p in paths):
        return f"no changed path matches {paths}"
    return None
