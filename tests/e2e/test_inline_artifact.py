"""An inline flow whose runner job checks out a local git repository at a templated ref.

The repository has two commits with different contents: the default branch points at the
second, so reading the first commit's content proves the ``ref`` option reached go-getter.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from runs_e2e_harness import E2E, start_e2e

pytestmark = pytest.mark.timeout(120)


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """``version.txt`` is "one" at tag v1 and "two" at the branch head."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "--quiet", "--initial-branch=main")
    (path / "version.txt").write_text("one\n")
    git(path, "add", "version.txt")
    git(path, "commit", "--quiet", "-m", "one")
    git(path, "tag", "v1")
    (path / "version.txt").write_text("two\n")
    git(path, "commit", "--quiet", "-am", "two")
    return path


@pytest.fixture
async def e2e(repo: Path, tmp_path: Path) -> AsyncIterator[E2E]:
    async for running in start_e2e(tmp_path):
        yield running


def flow(repo: Path) -> str:
    return f"""
apiVersion: nomad-pipeline.io/v1
kind: Flow
metadata:
  name: checkout
spec:
  variables:
    - name: git_ref
      type: string
      required: true
  inline:
    runner:
      driver: raw_exec
      artifacts:
        - source: "git::file://{repo}"
          destination: local/src
          options:
            ref: "${{var.git_ref}}"
    steps:
      - name: read
        run: cp local/src/version.txt seen.txt
      - name: show
        run: |
          printf 'ref %s: ' ${{var.git_ref}}
          cat seen.txt
"""


async def test_the_artifact_is_checked_out_at_the_ref_given(e2e: E2E, repo: Path) -> None:
    await e2e.apply(flow(repo))
    first_commit = git(repo, "rev-parse", "v1")
    head_commit = git(repo, "rev-parse", "HEAD")

    for ref, content in (("v1", "one"), (head_commit, "two"), (first_commit, "one")):
        result = await e2e.cli("run", "checkout", "--var", f"git_ref={ref}", "--wait")
        assert result.code == 0, result
        run_id = result.out.splitlines()[0]
        run = await e2e.get_run(run_id)
        assert run["status"]["phase"] == "success"
        assert [(step["name"], step["phase"]) for step in run["status"]["steps"]] == [
            ("read", "success"),
            ("show", "success"),
        ]
        # The runner reports a step's output before its end, so the log is complete by now.
        logs = await e2e.cli("logs", run_id, "show")
        assert logs.code == 0, logs
        assert logs.out == f"ref {ref}: {content}\n"


async def test_an_unknown_ref_fails_the_run_with_the_reason(e2e: E2E) -> None:
    await e2e.apply(flow(e2e.tmp_path / "repo"))
    result = await e2e.cli("run", "checkout", "--var", "git_ref=no-such-ref", "--wait")
    assert result.code != 0, result
    run = await e2e.get_run(result.out.splitlines()[0])
    assert run["status"]["phase"] == "failed"
    assert "failed to download artifact" in str(run["status"]), run["status"]
