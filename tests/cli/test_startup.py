"""What a command line loads before it answers: the CLI must start in a fraction of a second.

Structural, not timed: each case runs the CLI's entry function in a fresh interpreter and reads
``sys.modules`` afterwards, so a module-level import of something heavy (aiohttp, pydantic and
the models, PyYAML, python-hcl2/lark, the controller) fails the test on any machine, however
fast or busy it is.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_harness import DEFAULT_NAMESPACE_MANIFEST, Controller
from ports import free_port

from nomad_pipeline.resources.names import KIND_NAMES, kind_names_for
from nomad_pipeline.resources.registry import KINDS, kind_for

PROBE_DEADLINE = 60.0

# Runs the CLI as the console script does, then reports the exit code and every loaded module.
PROBE = """\
import json, sys
from nomad_pipeline.cli.main import main
report = sys.argv.pop(1)
code = main(sys.argv[1:])
with open(report, "w") as file:
    json.dump({"code": code, "modules": sorted(sys.modules)}, file)
"""

# Needed by no command that only talks to the controller, let alone by --help.
MODELS_PARSERS_AND_SERVER = (
    "pydantic",
    "yaml",
    "hcl2",
    "lark",
    "croniter",
    "nomad_pipeline.resources.kinds",
    "nomad_pipeline.resources.manifests",
    "nomad_pipeline.app",
    "nomad_pipeline.controller",
    "nomad_pipeline.reconcilers",
    "nomad_pipeline.store",
    "nomad_pipeline.nomad",
    "nomad_pipeline.devagent",
    "nomad_pipeline.runner",
)
# Needed only once a command talks to the controller.
CLIENT = ("asyncio", "aiohttp", "nomad_pipeline.cli.client")


@dataclass
class Probe:
    code: int
    out: str
    err: str
    modules: set[str]

    def loaded(self, packages: Sequence[str]) -> list[str]:
        """The loaded modules that are one of ``packages`` or inside one."""
        return sorted(
            module
            for module in self.modules
            if any(module == package or module.startswith(package + ".") for package in packages)
        )


async def probe(tmp_path: Path, *argv: str, stdin: str = "") -> Probe:
    report = tmp_path / "modules.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PROBE,
        str(report),
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(PROBE_DEADLINE):
        out, err = await process.communicate(stdin.encode())
    assert process.returncode == 0, f"the probe itself failed: {err.decode()}"
    result = json.loads(report.read_text())
    return Probe(result["code"], out.decode(), err.decode(), set(result["modules"]))


@pytest.mark.parametrize(
    ("argv", "code", "printed"),
    [
        (["--help"], 0, "usage: nomad-pipeline [-h]"),
        (["get", "--help"], 0, "usage: nomad-pipeline get [-h]"),
        (["apply", "--help"], 0, "usage: nomad-pipeline apply [-h]"),
        (["server", "--help"], 0, "usage: nomad-pipeline server [-h]"),
        (["get"], 1, "error: Usage: the following arguments are required: kind"),
    ],
    ids=["help", "get-help", "apply-help", "server-help", "usage-error"],
)
async def test_help_and_usage_errors_load_neither_client_nor_models(
    tmp_path: Path, argv: list[str], code: int, printed: str
) -> None:
    result = await probe(tmp_path, *argv)
    assert result.code == code, result.err
    assert (result.out if code == 0 else result.err).startswith(printed)
    assert result.loaded(MODELS_PARSERS_AND_SERVER + CLIENT) == []


async def test_get_from_the_controller_loads_the_client_but_no_models_or_parsers(
    controller: Controller, tmp_path: Path
) -> None:
    applied = await controller.cli("apply", "-f", "-", stdin=DEFAULT_NAMESPACE_MANIFEST)
    assert applied.code == 0, applied.err
    result = await probe(tmp_path, "get", "namespaces", "--addr", controller.addr)
    assert result.code == 0, result.err
    assert result.out.splitlines()[1].split()[:2] == ["default", "Active"]
    # The probe sees what a real request loads: the client is there, nothing heavier.
    assert set(CLIENT) <= result.modules
    assert result.loaded(MODELS_PARSERS_AND_SERVER) == []


async def test_an_unreachable_controller_is_reported_without_loading_models(
    tmp_path: Path,
) -> None:
    result = await probe(tmp_path, "describe", "flow", "x", "--addr", f"127.0.0.1:{free_port()}")
    assert result.code == 1
    assert result.err.startswith("error: Unavailable: cannot connect to the controller at ")
    assert result.loaded(MODELS_PARSERS_AND_SERVER) == []


async def test_yaml_manifests_load_the_models_but_not_the_hcl_parser(
    controller: Controller, tmp_path: Path
) -> None:
    manifest = tmp_path / "namespace.yaml"
    manifest.write_text(DEFAULT_NAMESPACE_MANIFEST)
    result = await probe(
        tmp_path, "apply", "--dry-run", "-f", str(manifest), "--addr", controller.addr
    )
    assert (result.code, result.out) == (
        0,
        "namespace.nomad-pipeline.io/default created (dry run)\n",
    )
    assert {"pydantic", "yaml"} <= result.modules
    assert result.loaded(["hcl2", "lark", "croniter"]) == []


async def test_hcl_manifests_load_the_hcl_parser(controller: Controller, tmp_path: Path) -> None:
    manifest = tmp_path / "namespace.hcl"
    manifest.write_text('namespace {\n  id = "team-b"\n  description = "B"\n}\n')
    result = await probe(tmp_path, "apply", "-f", str(manifest), "--addr", controller.addr)
    assert (result.code, result.out) == (0, "namespace.nomad-pipeline.io/team-b created\n")
    assert "hcl2" in result.modules


def test_kind_names_agree_with_the_models() -> None:
    assert [names.kind for names in KIND_NAMES] == list(KINDS)
    for names in KIND_NAMES:
        model = KINDS[names.kind]
        assert (names.plural, names.short_names, names.namespaced) == (
            model.PLURAL,
            model.SHORT_NAMES,
            model.NAMESPACED,
        )
        for alias in (names.kind, names.kind.upper(), names.plural, *names.short_names):
            assert kind_names_for(alias) is names
            assert kind_for(alias) is model
