"""Long-running commands: ``server`` (the controller), ``dev`` (agent + controller), ``dev-nomad``.

They run in the foreground until SIGINT/SIGTERM, which the served components handle themselves.
The composition root, the dev agent and asyncio are imported in the commands, not at module
level, so client commands (and --help) start without loading the controller.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def server_command(args: argparse.Namespace) -> int:
    import asyncio

    from nomad_pipeline.app import ControllerConfig, serve

    config = ControllerConfig(
        http_addr=args.http_addr,
        data_dir=Path(args.data_dir),
        nomad_addr=args.nomad_addr,
        nomad_token=args.nomad_token,
        state_backend=args.state_backend,
        log_format=args.log_format,
        advertise_addr=args.advertise_addr,
        leader_elect=args.leader_elect,
        leader_lease=args.leader_lease,
    )
    asyncio.run(serve(config))
    return 0


def dev_command(args: argparse.Namespace) -> int:
    import asyncio

    from nomad_pipeline.app import DevStack

    stack = DevStack(
        data_dir=Path(args.data_dir),
        port=args.port,
        nomad_port=args.nomad_port,
        log_format=args.log_format,
    )
    asyncio.run(stack.serve())
    return 0


def dev_nomad_command(argv: Sequence[str]) -> int:
    from nomad_pipeline.devagent.__main__ import main as dev_agent_main

    return dev_agent_main(argv)
