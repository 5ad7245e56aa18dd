"""Task artifacts, fetched before the task starts as go-getter does for Nomad.

Sources: ``git::<url>`` (the git CLI, ``ref`` and ``depth`` options), ``http(s)://`` (aiohttp,
``checksum`` option, archives unpacked unless ``archive=false``), and local paths or
``file://`` URLs (copied). Options come from ``GetterOptions`` and from the source's query
string, as go-getter merges them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import aiohttp

from nomad_pipeline.devagent.allocdir import resolve_in_task

Obj = dict[str, Any]

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=30)


class ArtifactError(Exception):
    pass


async def fetch(artifact: Obj, task_dir: Path) -> None:
    """Download one artifact into ``task_dir``/``RelativeDest``; raise ArtifactError."""
    source = str(artifact["GetterSource"])
    try:
        await _fetch(artifact, source, task_dir)
    except ArtifactError as exc:
        raise ArtifactError(f'failed to download artifact "{source}": {exc}') from exc
    except (OSError, ValueError, aiohttp.ClientError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f'failed to download artifact "{source}": {exc}') from exc


def _split_options(source: str, given: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Separate go-getter options from the query string of ``source``."""
    parts = urlsplit(source)
    options = dict(given)
    if not parts.query:
        return source, options
    kept: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("ref", "depth", "sshkey", "checksum", "archive", "filename"):
            options.setdefault(key, value)
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), options


async def _fetch(artifact: Obj, source: str, task_dir: Path) -> None:
    options = {str(k): str(v) for k, v in (artifact.get("GetterOptions") or {}).items()}
    mode = artifact.get("GetterMode") or "any"
    dest = resolve_in_task(task_dir, str(artifact.get("RelativeDest") or "local/"))
    if source.startswith("git::") or source.startswith("github.com/"):
        url, options = _split_options(source.removeprefix("git::"), options)
        if url.startswith("github.com/"):
            url = "https://" + url
        await _fetch_git(url, options, dest)
        return
    url, options = _split_options(source, options)
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        headers = {str(k): str(v) for k, v in (artifact.get("GetterHeaders") or {}).items()}
        await _fetch_http(url, headers, options, dest, mode)
        return
    if parts.scheme == "file":
        local = Path(unquote(parts.path))
    elif parts.scheme == "":
        local = Path(url)
        if not local.is_absolute():
            local = task_dir / local
    else:
        raise ArtifactError(f"unsupported source scheme {parts.scheme!r}")
    await asyncio.to_thread(_copy_local, local, options, dest, mode)


async def _run_git(*args: str) -> None:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    process = await asyncio.create_subprocess_exec(
        "git",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        detail = stderr.decode(errors="replace").strip()
        raise ArtifactError(f"git {args[0]} exited with {process.returncode}: {detail}")


async def _fetch_git(url: str, options: dict[str, str], dest: Path) -> None:
    if url.startswith("file://"):
        url = unquote(urlsplit(url).path)
    checkout = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".artifact-", dir=dest.parent))
    try:
        clone = ["clone", "--quiet"]
        if options.get("depth"):
            clone += ["--depth", options["depth"]]
        ref = options.get("ref")
        if ref and options.get("depth"):
            clone += ["--branch", ref]
        await _run_git(*clone, "--", url, str(checkout / "repo"))
        if ref and not options.get("depth"):
            await _run_git("-C", str(checkout / "repo"), "checkout", "--quiet", ref)
        await asyncio.to_thread(_merge_into, checkout / "repo", dest)
    finally:
        await asyncio.to_thread(shutil.rmtree, checkout, True)


def _merge_into(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, dest, dirs_exist_ok=True, symlinks=True)


def _verify_checksum(path: Path, checksum: str) -> None:
    algorithm, _, expected = checksum.partition(":")
    if not expected:
        algorithm, expected = "sha256", algorithm
    try:
        digest = hashlib.new(algorithm)
    except ValueError as exc:
        raise ArtifactError(f"unsupported checksum type {algorithm!r}") from exc
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected.lower():
        raise ArtifactError(
            f"checksums did not match: expected {expected}, got {digest.hexdigest()}"
        )


def _is_archive(name: str, options: dict[str, str]) -> bool:
    if options.get("archive", "").lower() in ("false", "0"):
        return False
    return name.lower().endswith(_ARCHIVE_SUFFIXES)


def _unpack(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.namelist():
                resolve_in_task(dest, member)
            bundle.extractall(dest)
        return
    with tarfile.open(archive) as bundle:
        bundle.extractall(dest, filter="data")


def _place_file(
    downloaded: Path, name: str, options: dict[str, str], dest: Path, mode: str
) -> None:
    if options.get("checksum"):
        _verify_checksum(downloaded, options["checksum"])
    if mode != "file" and _is_archive(name, options):
        _unpack(downloaded, dest)
        return
    if mode == "file":
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(downloaded, dest)
        return
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(downloaded, dest / (options.get("filename") or name))


async def _fetch_http(
    url: str, headers: dict[str, str], options: dict[str, str], dest: Path, mode: str
) -> None:
    name = Path(unquote(urlsplit(url).path)).name or "index.html"
    handle, temp_name = await asyncio.to_thread(
        tempfile.mkstemp, prefix=".artifact-", dir=dest.parent
    )
    temp = Path(temp_name)
    try:
        async with (
            aiohttp.ClientSession(timeout=_HTTP_TIMEOUT) as session,
            session.get(url, headers=headers) as response,
        ):
            if response.status != 200:
                raise ArtifactError(f"bad response code: {response.status}")
            with os.fdopen(handle, "wb") as out:
                handle = -1
                async for block in response.content.iter_chunked(1 << 16):
                    out.write(block)
        await asyncio.to_thread(_place_file, temp, name, options, dest, mode)
    finally:
        if handle >= 0:
            os.close(handle)
        await asyncio.to_thread(temp.unlink, True)


def _copy_local(source: Path, options: dict[str, str], dest: Path, mode: str) -> None:
    if not source.exists():
        raise ArtifactError(f"source path error: stat {source}: no such file or directory")
    if source.is_dir():
        if mode == "file":
            raise ArtifactError(f"source path {source} is a directory but mode is file")
        _merge_into(source, dest)
        return
    _place_file(source, source.name, options, dest, mode)
