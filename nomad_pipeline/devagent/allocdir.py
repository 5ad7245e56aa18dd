"""The allocation directory and the task environment, as Nomad's client builds them for raw_exec.

Layout (``client/allocdir``)::

    <alloc_root>/<alloc_id>/alloc/{data,logs,tmp}
    <alloc_root>/<alloc_id>/<task>/{local,secrets,private,tmp}
"""

from __future__ import annotations

import array
import fcntl
import os
import re
import struct
from pathlib import Path
from typing import Any

from nomad_pipeline.devagent.scheduler import node_variables

Obj = dict[str, Any]

SHARED_DIRS = ("data", "logs", "tmp")
TASK_DIRS = ("local", "secrets", "private", "tmp")

_META_UNSAFE = re.compile(r"[^A-Za-z0-9_.]")
_INTERPOLATION = re.compile(r"\$\{([^}]+)\}")


# Linux's ``FS_IOC_GETFLAGS``/``FS_IOC_SETFLAGS`` (``_IOR``/``_IOW('f', 1|2, long)``) and the
# ``FS_TOPDIR_FL`` inode flag (``chattr +T``).
_LONG_SIZE = struct.calcsize("l")
_FS_IOC_GETFLAGS = 0x80000000 | (_LONG_SIZE << 16) | 0x6601
_FS_IOC_SETFLAGS = 0x40000000 | (_LONG_SIZE << 16) | 0x6602
_FS_TOPDIR_FL = 0x00020000


def prepare_alloc_root(alloc_root: Path) -> None:
    """Create the directory of all allocation directories (blocking; run it off the loop),
    flagged as the top of separate directory hierarchies where the file system knows the flag.

    ext4 puts a new directory's inode in its parent's block group and scans that group's free
    inodes from its start; without a journal it also skips, one lookup each, every inode freed
    in the last minutes. Each allocation creates a dozen inodes, and a busy machine's temp
    directory is full of fresh deletions: on such a machine that scan cost more than anything
    else the agent does per step. The flag (``chattr +T``, "the top of directory hierarchies"
    for ext4's Orlov allocator) sends each allocation directory to a group with many free
    inodes, and its contents follow it. Other file systems (tmpfs...) refuse it: no change.
    """
    alloc_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(alloc_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
        if not flags[0] & _FS_TOPDIR_FL:
            flags[0] |= _FS_TOPDIR_FL
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags)
    except OSError:
        pass  # the file system has no such flag: it places inodes its own way
    finally:
        os.close(fd)


def build_alloc_dir(alloc_dir: Path, task_names: list[str]) -> None:
    """Create the directory tree (blocking; run it off the event loop).

    Parents before children, one ``mkdir`` each: ``Path.mkdir(parents=True)`` tries the leaf
    first and climbs back on every missing parent, and every step of a pipeline builds one.
    """
    root = os.fspath(alloc_dir)
    os.makedirs(root, exist_ok=True)
    _make_dir(f"{root}/alloc")
    for name in SHARED_DIRS:
        _make_dir(f"{root}/alloc/{name}")
    for task in task_names:
        _make_dir(f"{root}/{task}")
        for name in TASK_DIRS:
            path = f"{root}/{task}/{name}"
            _make_dir(path)
            if name in ("secrets", "private"):
                os.chmod(path, 0o700)


def _make_dir(path: str) -> None:
    """``mkdir``, content with a directory already there (a restarted allocation's)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def merged_meta(job: Obj, group: Obj, task: Obj) -> dict[str, str]:
    """Job meta (dispatch meta already merged in), then group, then task: later wins."""
    meta: dict[str, str] = {}
    for level in (job, group, task):
        meta.update(level.get("Meta") or {})
    return meta


def task_environment(
    *,
    alloc: Obj,
    group: Obj,
    task: Obj,
    alloc_dir: Path,
    node: Obj,
    host_env: dict[str, str],
) -> dict[str, str]:
    """The full environment of a raw_exec task: host env, ``NOMAD_*``, then interpolated Env."""
    job = alloc["Job"]
    task_dir = alloc_dir / task["Name"]
    resources = task.get("Resources") or {}
    nomad: dict[str, str] = {
        "NOMAD_ALLOC_DIR": str(alloc_dir / "alloc"),
        "NOMAD_TASK_DIR": str(task_dir / "local"),
        "NOMAD_SECRETS_DIR": str(task_dir / "secrets"),
        "NOMAD_ALLOC_ID": alloc["ID"],
        "NOMAD_SHORT_ALLOC_ID": alloc["ID"][:8],
        "NOMAD_ALLOC_NAME": alloc["Name"],
        "NOMAD_ALLOC_INDEX": str(alloc_index(alloc["Name"])),
        "NOMAD_JOB_ID": job["ID"],
        "NOMAD_JOB_NAME": job["Name"],
        "NOMAD_TASK_NAME": task["Name"],
        "NOMAD_GROUP_NAME": group["Name"],
        "NOMAD_NAMESPACE": alloc["Namespace"],
        "NOMAD_REGION": job.get("Region") or "global",
        "NOMAD_DC": node["Datacenter"],
        "NOMAD_CPU_LIMIT": str(resources.get("CPU") or 0),
        "NOMAD_MEMORY_LIMIT": str(resources.get("MemoryMB") or 0),
    }
    if resources.get("MemoryMaxMB"):
        nomad["NOMAD_MEMORY_MAX_LIMIT"] = str(resources["MemoryMaxMB"])
    if resources.get("Cores"):
        nomad["NOMAD_CPU_CORES"] = str(resources["Cores"])
    if job.get("ParentID"):
        nomad["NOMAD_JOB_PARENT_ID"] = job["ParentID"]
    meta = merged_meta(job, group, task)
    for key, value in meta.items():
        safe = _META_UNSAFE.sub("_", key)
        nomad[f"NOMAD_META_{safe}"] = value
        nomad[f"NOMAD_META_{safe.upper()}"] = value
    env = dict(host_env)
    env.update(nomad)
    lookup = interpolation_lookup(nomad, meta, node)
    for key, value in (task.get("Env") or {}).items():
        env[key] = interpolate(value, lookup)
    return env


def alloc_index(name: str) -> int:
    """The ``i`` of an allocation named ``job.group[i]``."""
    start = name.rfind("[")
    return int(name[start + 1 : -1]) if start >= 0 and name.endswith("]") else 0


def interpolation_lookup(env: dict[str, str], meta: dict[str, str], node: Obj) -> dict[str, str]:
    """Everything ``${...}`` may name: env vars, ``meta.*``, ``node.*`` and ``attr.*``."""
    lookup = dict(env)
    lookup.update({f"meta.{k}": v for k, v in meta.items()})
    lookup.update({f"attr.{k}": v for k, v in (node.get("Attributes") or {}).items()})
    lookup.update(node_variables(node))
    return lookup


def interpolate(value: str, lookup: dict[str, str]) -> str:
    """Replace ``${name}`` by its value; unknown names stay as written, as Nomad leaves them."""
    return _INTERPOLATION.sub(lambda m: lookup.get(m.group(1).strip(), m.group(0)), value)


def interpolate_config(config: Any, lookup: dict[str, str]) -> Any:
    """Interpolate every string inside a driver ``Config`` (Nomad does this for all drivers)."""
    if isinstance(config, str):
        return interpolate(config, lookup)
    if isinstance(config, list):
        return [interpolate_config(v, lookup) for v in config]
    if isinstance(config, dict):
        return {k: interpolate_config(v, lookup) for k, v in config.items()}
    return config


def host_environment() -> dict[str, str]:
    """The agent's own environment, passed through to raw_exec tasks as Nomad does."""
    return dict(os.environ)


def resolve_in_task(task_dir: Path, relative: str) -> Path:
    """``relative`` (``local/x``, ``../alloc/data/y``) under ``task_dir``, never outside its alloc.

    Validation already rejected escaping paths; this is the last guard before writing.
    """
    alloc_dir = task_dir.parent.resolve()
    target = (task_dir / relative).resolve()
    if target != alloc_dir and alloc_dir not in target.parents:
        raise ValueError(f"path {relative!r} escapes the allocation directory")
    return target
