"""What every command gets: where the controller is, which namespace, and where to print."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from nomad_pipeline.cli.client import ApiClient


@dataclass
class Context:
    addr: str
    namespace: str
    # Whether -n was given explicitly (apply fills unset namespaces with it, kubectl-style).
    namespace_given: bool
    all_namespaces: bool
    stdin: TextIO
    stdout: TextIO
    stderr: TextIO

    def api(self) -> ApiClient:
        # aiohttp (~0.2 s to import) loads only once a command talks to the controller.
        from nomad_pipeline.cli.client import ApiClient

        return ApiClient(self.addr)

    def out(self, text: str) -> None:
        """A line to stdout, flushed at once: ``-w`` and ``run --wait`` are read by pipes."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def err(self, text: str) -> None:
        self.stderr.write(text + "\n")
        self.stderr.flush()

    @staticmethod
    def now() -> datetime:
        return datetime.now(UTC)
