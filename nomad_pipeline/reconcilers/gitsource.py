"""Fetching git repositories for git-polling triggers and GitOps sync, with the git CLI.

Each remote is mirrored once into ``<cache>/<sha256(url)>.git`` (a bare mirror), then updated
with ``git remote update``; checkouts are exported from the mirror into a fresh directory. The
git CLI runs as an asyncio subprocess, so the event loop never blocks. Credentials come from a
resolved secret: for http(s) URLs an ``Authorization`` header passed through ``-c`` on the
command line of that one invocation (never written into the mirror's config); for ssh URLs a
private key file with mode 0600 in a temporary directory, removed afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from nomad_pipeline.errors import NomadPipelineError

# Unit and record separators: they cannot appear in commit metadata fields we read.
_FIELD = "\x1f"
_GIT_TIMEOUT = 300.0


class GitError(NomadPipelineError):
    http_status = 502
    reason = "GitError"


@dataclass(frozen=True, slots=True)
class Commit:
    sha: str
    author: str
    message: str


def _credential_args(url: str, secret: str | None) -> list[str]:
    if not secret or not url.startswith(("http://", "https://")):
        return []
    user_password = secret if ":" in secret else f"x-access-token:{secret}"
    token = base64.b64encode(user_password.encode()).decode()
    return ["-c", f"http.extraHeader=Authorization: Basic {token}"]


@contextlib.asynccontextmanager
async def _ssh_environment(url: str, secret: str | None) -> AsyncIterator[dict[str, str]]:
    env = {"GIT_TERMINAL_PROMPT": "0"}
    if not secret or url.startswith(("http://", "https://", "file://", "/")):
        yield env
        return
    with tempfile.TemporaryDirectory(prefix="np-ssh-") as directory:
        key = Path(directory) / "id"
        key.write_text(secret if secret.endswith("\n") else secret + "\n")
        key.chmod(0o600)
        env["GIT_SSH_COMMAND"] = f"ssh -i {key} -o IdentitiesOnly=yes -o BatchMode=yes"
        yield env


async def run_git(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run git; its stdout, or GitError carrying git's own message."""
    process = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=cwd,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(_GIT_TIMEOUT):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise GitError(f"git {args[0]} timed out after {_GIT_TIMEOUT:.0f}s") from None
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip().splitlines()
        raise GitError(f"git {args[0]} failed: {message[-1] if message else 'no output'}")
    return stdout.decode(errors="replace")


class GitMirrors:
    """Bare mirrors of remotes under ``cache_dir``; one fetch at a time per remote."""

    def __init__(self, cache_dir: Path) -> None:
        self._cache_dir = cache_dir
        self._locks: dict[str, asyncio.Lock] = {}

    def _mirror_path(self, url: str) -> Path:
        return self._cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.git"

    async def update(self, url: str, *, secret: str | None = None) -> Path:
        """Bring the mirror of ``url`` up to date (cloning it the first time)."""
        mirror = self._mirror_path(url)
        lock = self._locks.setdefault(url, asyncio.Lock())
        credentials = _credential_args(url, secret)
        async with lock, _ssh_environment(url, secret) as env:
            if (mirror / "HEAD").exists():
                await run_git(*credentials, "remote", "update", "--prune", cwd=mirror, env=env)
            else:
                self._cache_dir.mkdir(parents=True, exist_ok=True)
                partial = mirror.with_suffix(".partial")
                await asyncio.to_thread(shutil.rmtree, partial, True)
                await run_git(
                    *credentials, "clone", "--mirror", "--quiet", url, str(partial), env=env
                )
                partial.rename(mirror)
        return mirror

    async def resolve(
        self,
        url: str,
        *,
        branch: str | None = None,
        tag: str | None = None,
        commit: str | None = None,
        secret: str | None = None,
    ) -> Commit:
        """Fetch, then resolve the branch, tag or commit to a commit with its metadata."""
        mirror = await self.update(url, secret=secret)
        if commit is not None:
            revision = commit
        elif tag is not None:
            revision = f"refs/tags/{tag}^{{commit}}"
        else:
            revision = f"refs/heads/{branch or 'main'}"
        try:
            out = await run_git(
                "log", "-1", f"--format=%H{_FIELD}%an{_FIELD}%B", revision, "--", cwd=mirror
            )
        except GitError as exc:
            raise GitError(f"{url}: cannot resolve {revision!r}: {exc.message}") from exc
        sha, author, message = out.split(_FIELD, 2)
        return Commit(sha=sha.strip(), author=author, message=message.strip())

    async def export(self, url: str, sha: str, destination: Path) -> None:
        """Write the tree of ``sha`` into ``destination`` (created; must not exist)."""
        mirror = self._mirror_path(url)
        await asyncio.to_thread(destination.mkdir, parents=True)
        # A private index file: exports of one mirror never contend for its index.lock.
        with tempfile.TemporaryDirectory(prefix="np-export-") as scratch:
            await run_git(
                f"--work-tree={destination}",
                "checkout",
                "--force",
                sha,
                "--",
                ".",
                cwd=mirror,
                env={"GIT_INDEX_FILE": str(Path(scratch) / "index")},
            )
