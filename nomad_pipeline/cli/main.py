"""``nomad-pipeline``: a thin kubectl-like CLI over the controller's HTTP API.

Client commands parse their arguments, make requests with aiohttp (one ``asyncio.run`` per
command) and print. Exit codes: 0 success, 1 error (one line ``error: <reason>: <message>`` on
stderr), 130 when interrupted (Ctrl-C ends ``get -w`` and ``logs -f``).

Users type these commands all day, so start-up stays short: parsing the command line loads no
asyncio, aiohttp (``client.py``, imported by ``Context.api()``), pydantic models, PyYAML or HCL
parser; each command imports what it needs where it needs it (``tests/cli/test_startup.py``
checks what ``--help`` and ``get`` load).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

from nomad_pipeline.cli import objects, runs, servers
from nomad_pipeline.cli.context import Context
from nomad_pipeline.cli.output import OUTPUT_FORMATS, error_line
from nomad_pipeline.errors import Invalid, NomadPipelineError

ADDR_ENV = "NOMAD_PIPELINE_ADDR"
ADVERTISE_ADDR_ENV = "NOMAD_PIPELINE_ADVERTISE_ADDR"
DEFAULT_ADDR = "http://127.0.0.1:8080"
DEFAULT_NAMESPACE = "default"
EXIT_INTERRUPTED = 130

ClientHandler = Callable[[Context, argparse.Namespace], Coroutine[Any, Any, int]]
ServerHandler = Callable[[argparse.Namespace], int]


class UsageError(Invalid):
    reason = "Usage"


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are errors like any other: one line and exit 1, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _global_options(*, suppress: bool) -> _Parser:
    """--addr/-n/-A, accepted before and after the command. The copy on each command has no
    defaults so it never overwrites a value given before the command."""
    parser = _Parser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--addr",
        default=default,
        help=f"controller API address (env {ADDR_ENV}, default {DEFAULT_ADDR})",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default=default,
        help=f"namespace of the objects (default: {DEFAULT_NAMESPACE})",
    )
    parser.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="list across every namespace",
    )
    return parser


def _add_files(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        required=required,
        metavar="FILE|DIR|-",
        help="manifest file, directory or - for stdin (repeatable)",
    )
    parser.add_argument(
        "-R", "--recursive", action="store_true", help="descend into subdirectories"
    )


class _VersionAction(argparse.Action):
    """``--version``: the client's version, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="print the client's version and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from nomad_pipeline.resources.names import package_version

        sys.stdout.write(f"nomad-pipeline {package_version()}\n")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nomad-pipeline",
        description="Declarative pipelines on HashiCorp Nomad.",
        parents=[_global_options(suppress=False)],
    )
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    client = [_global_options(suppress=True)]

    def command(name: str, handler: ClientHandler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=client, help=help_text, description=help_text)
        sub.set_defaults(client_handler=handler)
        return sub

    apply = command("apply", objects.apply_command, "create or update objects from manifests")
    _add_files(apply, required=True)
    apply.add_argument("--dry-run", action="store_true", help="report what would change only")

    diff = command("diff", objects.diff_command, "show how stored objects differ from manifests")
    _add_files(diff, required=True)

    get = command("get", objects.get_command, "list objects or show one")
    get.add_argument("kind", help="kind: flows, runs, triggers, namespaces (ns), gitrepositories")
    get.add_argument("name", nargs="?", help="one object's name")
    get.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table")
    get.add_argument("-l", "--selector", help="label selector, e.g. team=a,env=prod")
    get.add_argument("-w", "--watch", action="store_true", help="print a row per change")

    describe = command("describe", objects.describe_command, "show one object in detail")
    describe.add_argument("kind")
    describe.add_argument("name")

    delete = command("delete", objects.delete_command, "delete objects by name or manifest")
    delete.add_argument("kind", nargs="?")
    delete.add_argument("names", nargs="*", metavar="NAME")
    _add_files(delete, required=False)
    delete.add_argument(
        "--ignore-not-found", action="store_true", help="objects already gone are not an error"
    )
    delete.add_argument(
        "--wait",
        nargs="?",
        const=True,
        default=True,
        type=objects.parse_flag,
        metavar="true|false",
        help="wait until objects held by finalizers are gone (default true; --wait=false "
        "returns once the deletion is requested)",
    )
    delete.add_argument(
        "--timeout",
        default=objects.DEFAULT_DELETE_TIMEOUT,
        type=objects.parse_timeout,
        metavar="DURATION",
        help="how long --wait waits, e.g. 60s, 2m, 1m30s (default 60s)",
    )

    schema = command("schema", objects.schema_command, "print the JSON Schema of the kinds")
    schema.add_argument("kind", nargs="?")

    sync = command("sync", objects.sync_command, "ask for an immediate GitRepository sync")
    sync.add_argument("name", metavar="GITREPO")
    sync.add_argument(
        "--wait", action="store_true", help="wait for the sync; exit 0 when the repo is Ready"
    )

    run = command("run", runs.run_command, "start a run of a flow; prints the run name")
    run.add_argument("flow")
    run.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")
    run.add_argument("--wait", action="store_true", help="wait for the end; exit 0 on success")
    run.add_argument("--follow", action="store_true", help="like --wait, also streaming logs")

    cancel = command("cancel", runs.cancel_command, "cancel a run")
    cancel.add_argument("run")

    rerun = command("rerun", runs.rerun_command, "start a new run with a run's variables")
    rerun.add_argument("run")
    rerun.add_argument("--from-failed", action="store_true", help="reuse succeeded steps")
    rerun.add_argument("--wait", action="store_true")
    rerun.add_argument("--follow", action="store_true")

    logs = command("logs", runs.logs_command, "print a run's step logs")
    logs.add_argument("run")
    logs.add_argument("step", nargs="?")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the steps end")
    logs.add_argument("--stderr", action="store_true", help="stderr instead of stdout")

    command("version", objects.version_command, "print the client's and the server's versions")

    _add_server_commands(commands)
    return parser


def _add_server_commands(commands: argparse._SubParsersAction[_Parser]) -> None:
    server = commands.add_parser("server", help="run the controller")
    server.set_defaults(server_handler=servers.server_command)
    # `server run` is the seed's spelling of the same command.
    server.add_argument("action", nargs="?", choices=["run"], help=argparse.SUPPRESS)
    server.add_argument(
        "--http-addr", default="127.0.0.1:8080", help="HOST:PORT or http://HOST:PORT"
    )
    server.add_argument("--data-dir", default="data", help="step logs and local state")
    server.add_argument("--nomad-addr", help="Nomad's address (env NOMAD_ADDR)")
    server.add_argument("--nomad-token", help="Nomad ACL token (env NOMAD_TOKEN)")
    server.add_argument("--state-backend", choices=["dev", "nomad-vars"], default="dev")
    server.add_argument("--log-format", choices=["text", "json"], default="text")
    server.add_argument(
        "--advertise-addr",
        default=os.environ.get(ADVERTISE_ADDR_ENV),
        metavar="URL",
        help="the API's address as runners in Nomad allocations reach it, e.g. "
        f"http://10.0.0.5:8080 (env {ADVERTISE_ADDR_ENV}; default: the --http-addr, a "
        "wildcard as loopback, right only when Nomad runs on this host)",
    )
    server.add_argument(
        "--leader-elect",
        action="store_true",
        help="run the reconcilers only while holding a Nomad Variable lock, so several "
        "controllers can share one Nomad (needs --state-backend nomad-vars); every instance "
        "serves the API",
    )
    server.add_argument(
        "--leader-lease",
        default="15s",
        metavar="DURATION",
        help="the leader lock's TTL, 10s to 24h (default 15s); a leader that cannot renew it "
        "for 2/3 of this stops reconciling",
    )
    server.add_argument(
        "--state-nomad-vars-cache-enabled",
        nargs="?",
        const="true",
        metavar="BOOL",
        help="the seed's flag, accepted so its command lines keep working: the nomad-vars "
        "backend always serves reads from its cache",
    )

    dev = commands.add_parser("dev", help="run a dev agent and a controller together")
    dev.set_defaults(server_handler=servers.dev_command)
    dev.add_argument("--data-dir", default="data")
    dev.add_argument("--port", type=int, default=8080, help="controller API port")
    dev.add_argument("--nomad-port", type=int, default=4646, help="dev agent's Nomad API port")
    dev.add_argument("--log-format", choices=["text", "json"], default="text")

    # The dev agent parses its own options ([--bind] [--port] [--data-dir | --in-memory]
    # [--node-name] [--acl-token], and --help): they are handed over as given.
    dev_nomad = commands.add_parser(
        "dev-nomad", add_help=False, help="run the local Nomad-compatible agent"
    )
    dev_nomad.set_defaults(passthrough_handler=servers.dev_nomad_command)


def _context(args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> Context:
    addr = args.addr or os.environ.get(ADDR_ENV) or DEFAULT_ADDR
    if "://" not in addr:
        # HOST:PORT, as `server --http-addr` takes it.
        addr = f"http://{addr}"
    if not addr.startswith(("http://", "https://")) or not urlsplit(addr).netloc:
        raise UsageError(f"--addr {addr!r} must be a URL such as {DEFAULT_ADDR}")
    return Context(
        addr=addr,
        namespace=args.namespace or DEFAULT_NAMESPACE,
        namespace_given=args.namespace is not None,
        all_namespaces=bool(args.all_namespaces),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
    )


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
        if hasattr(args, "passthrough_handler"):
            passthrough: Callable[[Sequence[str]], int] = args.passthrough_handler
            return passthrough(unknown)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if hasattr(args, "server_handler"):
            handler: ServerHandler = args.server_handler
            return handler(args)
        ctx = _context(args, stdin, stdout, stderr)
        client_handler: ClientHandler = args.client_handler
        # Only client commands need an event loop; --help and usage errors never load asyncio.
        import asyncio

        return asyncio.run(client_handler(ctx, args))
    except NomadPipelineError as exc:
        stderr.write(error_line(exc) + "\n")
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        stderr.write(f"error: {type(exc).__name__}: {where}{exc.strerror or exc}\n")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        # argparse's --help.
        return exc.code if isinstance(exc.code, int) else 0
    stderr.flush()
    return 1


if __name__ == "__main__":
    sys.exit(main())
