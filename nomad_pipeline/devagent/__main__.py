"""``python -m nomad_pipeline.devagent``: run the dev agent (``nomad-pipeline dev-nomad``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from nomad_pipeline.devagent.server import DevAgentConfig, serve


def build_parser(prog: str = "nomad-pipeline dev-nomad") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a local Nomad-compatible agent (one server + one raw_exec client).",
    )
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=4646, help="HTTP port (0: any free port)")
    storage = parser.add_mutually_exclusive_group()
    storage.add_argument(
        "--data-dir", type=Path, help="keep jobs, allocations and variables under DIR"
    )
    storage.add_argument(
        "--in-memory", action="store_true", help="keep nothing across restarts (the default)"
    )
    parser.add_argument("--node-name", help="the client node's name (Nomad's -node)")
    parser.add_argument(
        "--acl-token", help="require this token (X-Nomad-Token) on every endpoint but status/*"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> DevAgentConfig:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port: {args.port} is not a TCP port (0-65535)")
    return DevAgentConfig(
        bind=args.bind,
        port=args.port,
        data_dir=args.data_dir,
        node_name=args.node_name,
        acl_token=args.acl_token,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"error: could not start the dev agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
