"""Every kind by name, and the names users may type for one (``flow``, ``flows``, ``ns`` ...)."""

from __future__ import annotations

from nomad_pipeline.resources.kinds import Flow, GitRepository, Namespace, Run, Trigger
from nomad_pipeline.resources.meta import Resource
from nomad_pipeline.resources.names import kind_names_for

KINDS: dict[str, type[Resource]] = {
    kind.KIND: kind for kind in (Namespace, Flow, Run, Trigger, GitRepository)
}


def kind_for(name: str) -> type[Resource]:
    """The kind called ``name`` (Kind, singular, plural or short name; any case)."""
    return KINDS[kind_names_for(name).kind]
