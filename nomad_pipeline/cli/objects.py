"""Object commands: apply, diff, get (and -w), describe, delete, schema, sync."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nomad_pipeline.cli.context import Context
from nomad_pipeline.cli.describe import describe_object
from nomad_pipeline.cli.output import (
    NONE,
    OutputFormat,
    Table,
    columns_for,
    dig,
    error_line,
    find_condition,
    kind_name,
    object_name,
    render_objects,
    to_json,
    to_yaml,
    unified_diff,
)
from nomad_pipeline.errors import Gone, Invalid, NomadPipelineError, NotFound
from nomad_pipeline.resources.names import KindNames, kind_names_for, package_version

if TYPE_CHECKING:
    from nomad_pipeline.cli.client import ApiClient
    from nomad_pipeline.resources.manifests import Manifest
    from nomad_pipeline.resources.meta import Resource

STDIN_PATH = "-"
GITREPOSITORIES = "gitrepositories"


# --- manifests ------------------------------------------------------------------------------


def load_manifests(ctx: Context, files: Sequence[str], *, recursive: bool) -> list[Manifest]:
    """Every object of the ``-f`` arguments in order; ``-`` reads stdin. -n fills unset
    namespaces and must agree with namespaces the files spell out (kubectl's rule)."""
    # The models and parsers (pydantic, PyYAML, python-hcl2) load only for commands reading files.
    from nomad_pipeline.resources.manifests import load_paths, load_text

    manifests: list[Manifest] = []
    for entry in files:
        if entry == STDIN_PATH:
            manifests += load_text(ctx.stdin.read(), filename="<stdin>", base_dir=Path.cwd())
        else:
            manifests += load_paths([Path(entry)], recursive=recursive, cwd=Path.cwd())
    if not manifests:
        raise Invalid(f"no objects found in {', '.join(files)}")
    if ctx.namespace_given:
        for manifest in manifests:
            _apply_namespace_flag(manifest, ctx.namespace)
    return manifests


def _apply_namespace_flag(manifest: Manifest, namespace: str) -> None:
    obj = manifest.obj
    if not type(obj).NAMESPACED:
        return
    if "namespace" not in obj.metadata.model_fields_set:
        obj.metadata.namespace = namespace
    elif obj.metadata.namespace != namespace:
        raise Invalid(
            f"{manifest.source}: document {manifest.document}: the namespace from the object "
            f"{obj.metadata.namespace!r} does not match the namespace {namespace!r} from -n"
        )


def wire_for_apply(obj: Resource) -> dict[str, Any]:
    """The object as sent to apply: status is the controller's, never the user's."""
    wire = obj.to_wire()
    wire.pop("status", None)
    return wire


def _namespace_arg(ctx: Context, kind: KindNames) -> str | None:
    """The namespace segment for a request: None for cluster-scoped kinds and for -A lists."""
    if not kind.namespaced or ctx.all_namespaces:
        return None
    return ctx.namespace


# --- apply / diff ---------------------------------------------------------------------------


async def apply_command(ctx: Context, args: argparse.Namespace) -> int:
    manifests = load_manifests(ctx, args.filename, recursive=args.recursive)
    items = [wire_for_apply(manifest.obj) for manifest in manifests]
    async with ctx.api() as api:
        results = await api.apply(items, dry_run=args.dry_run)
    suffix = " (dry run)" if args.dry_run else ""
    for result in results:
        ctx.out(f"{kind_name(str(result['kind']), str(result['name']))} {result['action']}{suffix}")
    return 0


async def diff_command(ctx: Context, args: argparse.Namespace) -> int:
    """Stored against what applying would store (a server dry run, so defaults and loaded
    jobspecs count); exit 1 when anything differs, as ``kubectl diff`` does."""
    manifests = load_manifests(ctx, args.filename, recursive=args.recursive)
    items = [wire_for_apply(manifest.obj) for manifest in manifests]
    differs = False
    async with ctx.api() as api:
        results = await api.apply(items, dry_run=True)
        for result in results:
            local = result.get("object")
            if not isinstance(local, dict):
                raise NomadPipelineError("the controller's dry-run answer has no objects to diff")
            kind = kind_names_for(str(local["kind"]))
            name = str(local["metadata"]["name"])
            namespace = local["metadata"].get("namespace") if kind.namespaced else None
            stored = await _get_or_none(api, kind.plural, namespace, name)
            text = unified_diff(stored, local, label=kind_name(kind.kind, name))
            if text:
                differs = True
                ctx.stdout.write(text if text.endswith("\n") else text + "\n")
    ctx.stdout.flush()
    return 1 if differs else 0


async def _get_or_none(
    api: ApiClient, plural: str, namespace: str | None, name: str
) -> dict[str, Any] | None:
    try:
        return await api.get_object(plural, namespace, name)
    except NotFound:
        return None


# --- get ------------------------------------------------------------------------------------


async def get_command(ctx: Context, args: argparse.Namespace) -> int:
    kind = kind_names_for(args.kind)
    output: OutputFormat = args.output
    with_namespace = kind.namespaced and ctx.all_namespaces
    # One named object lives in one namespace: -A only widens lists.
    namespace = (
        (ctx.namespace if kind.namespaced else None)
        if args.name is not None
        else _namespace_arg(ctx, kind)
    )
    async with ctx.api() as api:
        if args.name is not None:
            obj = await api.get_object(kind.plural, namespace, args.name)
            objects, version = [obj], str(obj["metadata"].get("resource_version") or "0")
        else:
            objects, version = await api.list_objects(
                kind.plural, namespace, selector=args.selector
            )
            objects.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        table = Table(columns_for(kind.kind, wide=output == "wide", with_namespace=with_namespace))
        if objects or (output in ("json", "yaml") and not args.watch):
            _print_initial(ctx, objects, output=output, kind=kind.kind, args=args, table=table)
        elif not args.watch:
            where = "any namespace" if namespace is None else f"namespace {namespace!r}"
            ctx.err(f"No {kind.plural} found in {where}.")
        if args.watch:
            await _watch(
                ctx,
                api,
                kind,
                args,
                namespace=namespace,
                table=table,
                version=version,
                header=not objects,
            )
    return 0


def _print_initial(
    ctx: Context,
    objects: list[dict[str, Any]],
    *,
    output: OutputFormat,
    kind: str,
    args: argparse.Namespace,
    table: Table,
) -> None:
    if output in ("table", "wide"):
        rows = [table.cells(obj, ctx.now()) for obj in objects]
        for line in table.render(rows, header=True):
            ctx.out(line)
        return
    if args.watch:
        for obj in objects:
            _print_watched(ctx, obj, output, table, header=False)
        return
    single = args.name is not None
    ctx.out(render_objects(objects, output, single=single, kind=kind, now=ctx.now()))


def _print_watched(
    ctx: Context, obj: Mapping[str, Any], output: OutputFormat, table: Table, *, header: bool
) -> None:
    if output in ("table", "wide"):
        for line in table.render([table.cells(obj, ctx.now())], header=header):
            ctx.out(line)
    elif output == "json":
        ctx.out(to_json(obj))
    elif output == "yaml":
        ctx.out("---\n" + to_yaml(obj).rstrip("\n"))
    else:
        ctx.out(object_name(obj))


async def _watch(
    ctx: Context,
    api: ApiClient,
    kind: KindNames,
    args: argparse.Namespace,
    *,
    namespace: str | None,
    table: Table,
    version: str,
    header: bool,
) -> None:
    """A row per change until interrupted; resumes after the server ends the stream, and
    re-lists (printing nothing again) when the version expired. A server that ended the stream
    and no longer answers is going away: that ends the watch with a note, not an error."""
    # The client module (aiohttp) is loaded by ctx.api() already, for commands that reach here.
    from nomad_pipeline.cli.client import ControllerUnreachableError

    resume_from: str | None = version
    stream_ended = False
    while True:
        try:
            async for event in api.watch(
                kind.plural, namespace, resource_version=resume_from, selector=args.selector
            ):
                stream_ended = False
                obj = event.get("object")
                if not isinstance(obj, dict):
                    continue
                resume_from = str(obj.get("metadata", {}).get("resource_version") or resume_from)
                if args.name is not None and obj.get("metadata", {}).get("name") != args.name:
                    continue
                _print_watched(ctx, obj, args.output, table, header=header)
                header = False
        except Gone:
            _, resume_from = await api.list_objects(kind.plural, namespace, selector=args.selector)
            continue
        except ControllerUnreachableError:
            if not stream_ended:
                raise
            ctx.err("watch ended: the server closed the stream")
            return
        stream_ended = True


# --- describe / delete ----------------------------------------------------------------------


async def describe_command(ctx: Context, args: argparse.Namespace) -> int:
    kind = kind_names_for(args.kind)
    async with ctx.api() as api:
        namespace = ctx.namespace if kind.namespaced else None
        obj = await api.get_object(kind.plural, namespace, args.name)
    ctx.out(describe_object(obj, ctx.now()))
    return 0


# ``delete --timeout`` when not given, as kubectl waits for finalizers by default.
DEFAULT_DELETE_TIMEOUT = 60.0
_FLAG_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_TIMEOUT_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Numbers with units (``1m30s``); "ms" before "m" so "5ms" is not read as minutes.
_TIMEOUT_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_TIMEOUT_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")
_TIMEOUT_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h))+$")


def parse_flag(text: str) -> bool:
    """``--wait=false`` and friends: true/false, 1/0, yes/no."""
    value = _FLAG_VALUES.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def parse_timeout(text: str) -> float:
    """Seconds from ``60s``, ``2m``, ``1m30s``, ``500ms`` or a bare number of seconds."""
    stripped = text.strip()
    if _TIMEOUT_SECONDS.match(stripped):
        return float(stripped)
    if not _TIMEOUT_WHOLE.match(stripped):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected e.g. 60s, 2m, 1m30s or a number of seconds"
        )
    return sum(
        float(number) * _TIMEOUT_UNITS[unit] for number, unit in _TIMEOUT_PART.findall(stripped)
    )


class DeletionTimeout(NomadPipelineError):
    """``delete --wait`` gave up: finalizers still hold the object."""

    http_status = 504
    reason = "Timeout"


def _finalizers(obj: Mapping[str, Any]) -> list[str]:
    finalizers = dig(obj, "metadata", "finalizers")
    return [str(name) for name in finalizers] if isinstance(finalizers, list) else []


async def _wait_gone(
    api: ApiClient, kind: KindNames, namespace: str | None, name: str, seconds: float
) -> Mapping[str, Any] | None:
    """None once the object is gone; the object as last seen if it is still there after
    ``seconds`` (its finalizers are what the deletion waits for)."""
    import asyncio

    latest: Mapping[str, Any] | None = None
    try:
        async with asyncio.timeout(seconds):
            latest = await api.get_object(kind.plural, namespace, name)
            version = str(dig(latest, "metadata", "resource_version") or "0")
            updates = api.object_updates(kind.plural, namespace, name, resource_version=version)
            async with contextlib.aclosing(updates):
                async for update in updates:
                    latest = update
    except NotFound:
        return None
    except TimeoutError:
        pass
    if latest is None:
        # Not even read back in time: ask once more, without a deadline on the answer.
        try:
            latest = await api.get_object(kind.plural, namespace, name)
        except NotFound:
            return None
    return latest


async def delete_command(ctx: Context, args: argparse.Namespace) -> int:
    targets: list[tuple[KindNames, str | None, str]] = []
    if args.filename:
        if args.kind is not None:
            raise Invalid("delete takes either KIND NAME... or -f FILE, not both")
        manifests = load_manifests(ctx, args.filename, recursive=args.recursive)
        for manifest in manifests:
            kind = kind_names_for(type(manifest.obj).KIND)
            namespace = manifest.obj.metadata.namespace if kind.namespaced else None
            targets.append((kind, namespace, manifest.obj.metadata.name))
    else:
        if args.kind is None or not args.names:
            raise Invalid("delete needs KIND NAME... or -f FILE")
        kind = kind_names_for(args.kind)
        namespace = ctx.namespace if kind.namespaced else None
        targets = [(kind, namespace, name) for name in args.names]
    # asyncio and the client module (aiohttp) are loaded by ctx.api() as well, for commands
    # that reach here.
    import asyncio

    from nomad_pipeline.cli.client import ControllerUnreachableError

    failed = False
    async with ctx.api() as api:
        deadline = asyncio.get_running_loop().time() + args.timeout
        # Namespaced objects first, waited for before namespaces: a namespace still holding
        # objects (held by finalizers) cannot be deleted.
        for scope in (True, False):
            held: list[tuple[KindNames, str | None, str]] = []
            for kind, namespace, name in targets:
                if kind.namespaced != scope:
                    continue
                try:
                    answer = await api.delete_object(kind.plural, namespace, name)
                except ControllerUnreachableError:
                    raise
                except NomadPipelineError as exc:
                    # Like kubectl: report this one and go on with the others.
                    if isinstance(exc, NotFound) and args.ignore_not_found:
                        continue
                    ctx.err(error_line(exc))
                    failed = True
                    continue
                label = kind_name(kind.kind, name)
                if not dig(answer, "metadata", "deletion_timestamp"):
                    ctx.out(f"{label} deleted")
                elif args.wait:
                    held.append((kind, namespace, name))
                else:
                    pending = ", ".join(_finalizers(answer))
                    ctx.out(f"{label} deletion requested (finalizers: {pending})")
            # Every delete of the batch is sent before waiting, as kubectl does.
            if held and not await _all_gone(ctx, api, held, deadline, args.timeout):
                failed = True
    return 1 if failed else 0


async def _all_gone(
    ctx: Context,
    api: ApiClient,
    held: list[tuple[KindNames, str | None, str]],
    deadline: float,
    waited: float,
) -> bool:
    """Print each object's deletion as it completes, until the loop-clock ``deadline``; False
    (each reported with its pending finalizers) if any is still there when it passes."""
    import asyncio

    loop = asyncio.get_running_loop()
    all_gone = True
    for kind, namespace, name in held:
        label = kind_name(kind.kind, name)
        remaining = await _wait_gone(api, kind, namespace, name, max(0.0, deadline - loop.time()))
        if remaining is None:
            ctx.out(f"{label} deleted")
            continue
        pending = ", ".join(_finalizers(remaining)) or NONE
        ctx.err(
            error_line(
                DeletionTimeout(
                    f"{label} is still being deleted after {waited:g}s, waiting for finalizers: "
                    f"{pending} (see `nomad-pipeline describe {kind.plural} {name}`)"
                )
            )
        )
        all_gone = False
    return all_gone


# --- schema / sync --------------------------------------------------------------------------


async def schema_command(ctx: Context, args: argparse.Namespace) -> int:
    # The schemas are built from the pydantic models, which only this command needs.
    from nomad_pipeline.resources.schema import json_schemas

    schemas = json_schemas()
    if args.kind is None:
        ctx.out(json.dumps(schemas, indent=2))
        return 0
    kind = kind_names_for(args.kind)
    ctx.out(json.dumps(schemas[kind.kind], indent=2))
    return 0


async def sync_command(ctx: Context, args: argparse.Namespace) -> int:
    """Ask for an immediate GitRepository sync, as ``flux reconcile`` does; with ``--wait``,
    wait for the sync that answers it and exit 0 only if the repository is Ready."""
    label = kind_name("GitRepository", args.name)
    async with ctx.api() as api:
        requested_at = await api.request_sync(ctx.namespace, args.name)
        ctx.out(f"{label} sync requested")
        if not args.wait:
            return 0
        repository = await api.get_object(GITREPOSITORIES, ctx.namespace, args.name)
        if not _answered(repository, requested_at):
            version = str(dig(repository, "metadata", "resource_version") or "0")
            updates = api.object_updates(
                GITREPOSITORIES, ctx.namespace, args.name, resource_version=version
            )
            async with contextlib.aclosing(updates):
                async for update in updates:
                    if _answered(update, requested_at):
                        repository = update
                        break
    ready = find_condition(repository, "Ready")
    revision = dig(repository, "status", "last_applied_revision") or NONE
    if ready is not None and ready.get("status") == "True":
        ctx.out(f"{label} synced: revision {revision}")
        return 0
    why = "no Ready condition" if ready is None else ready.get("message") or ready.get("reason")
    ctx.err(f"error: SyncFailed: {label} is not ready after the sync: {why}")
    return 1


def _answered(repository: Mapping[str, Any], requested_at: str) -> bool:
    handled = dig(repository, "status", "last_handled_reconcile_at")
    return isinstance(handled, str) and handled == requested_at


async def version_command(ctx: Context, args: argparse.Namespace) -> int:
    """kubectl's ``version``: the client's version, then the server's (an unreachable server
    is an error after the client's line)."""
    ctx.out(f"Client Version: {package_version()}")
    async with ctx.api() as api:
        served = await api.request("GET", "/version")
    if not isinstance(served, dict):
        raise NomadPipelineError(f"the controller answered {served!r} for /version")
    ctx.out(f"Server Version: {served.get('version')} (API {served.get('api_version')})")
    return 0
