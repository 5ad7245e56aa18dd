"""The API's vocabulary without its models: group and version, run phases, and every kind's names.

Importing this module loads neither pydantic nor any parser, so the CLI can address kinds and read
phases in the few milliseconds a command line should take to start. ``meta``, ``kinds`` and
``registry`` take these names from here; the models repeat each kind's names as class variables
(``KIND``, ``PLURAL``, ``SHORT_NAMES``, ``NAMESPACED``); ``tests/cli/test_startup.py`` keeps the
two in agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nomad_pipeline.errors import Invalid

API_GROUP = "nomad-pipeline.io"
API_VERSION = f"{API_GROUP}/v1"

Phase = Literal["pending", "running", "success", "failed", "cancelled", "skipped"]
TERMINAL_PHASES: frozenset[str] = frozenset({"success", "failed", "cancelled", "skipped"})


@dataclass(frozen=True, slots=True)
class KindNames:
    """How one kind is called on the wire and on the command line."""

    kind: str
    plural: str
    short_names: tuple[str, ...] = ()
    # Namespaces are cluster-scoped; objects of every other kind live in a namespace.
    namespaced: bool = True

    @property
    def aliases(self) -> tuple[str, ...]:
        """What users may type for the kind, lower-case, without repeats."""
        return tuple(dict.fromkeys([self.kind.lower(), self.plural, *self.short_names]))


KIND_NAMES: tuple[KindNames, ...] = (
    KindNames("Namespace", "namespaces", ("ns",), namespaced=False),
    KindNames("Flow", "flows"),
    KindNames("Run", "runs"),
    KindNames("Trigger", "triggers"),
    KindNames("GitRepository", "gitrepositories", ("gitrepo",)),
)

_BY_NAME: dict[str, KindNames] = {
    alias.lower(): names for names in KIND_NAMES for alias in names.aliases
}


def kind_names_for(name: str) -> KindNames:
    """The kind called ``name`` (Kind, singular, plural or short name; any case)."""
    names = _BY_NAME.get(name.strip().lower())
    if names is None:
        known = ", ".join("/".join(names.aliases) for names in KIND_NAMES)
        raise Invalid(f"unknown kind {name!r}; known kinds: {known}", field="kind")
    return names


def package_version() -> str:
    """The installed nomad-pipeline's version (``unknown`` when run from an uninstalled tree)."""
    from importlib import metadata  # local: only `version` and the API's /version need it

    try:
        return metadata.version("nomad-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"
