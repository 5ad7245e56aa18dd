"""Every kind by name, and the names users may type for one (``flow``, ``flows``, ``ns`` ...)."""

from __future__ import annotations

from nomad_pipeline.errors import Invalid
from nomad_pipeline.resources.kinds import Flow, GitRepository, Namespace, Run, Trigger
from nomad_pipeline.resources.meta import Resource

KINDS: dict[str, type[Resource]] = {
    kind.KIND: kind for kind in (Namespace, Flow, Run, Trigger, GitRepository)
}

_BY_NAME: dict[str, type[Resource]] = {
    alias.lower(): kind
    for kind in KINDS.values()
    for alias in (kind.KIND, kind.PLURAL, *kind.SHORT_NAMES)
}


def kind_for(name: str) -> type[Resource]:
    """The kind called ``name`` (Kind, singular, plural or short name; any case)."""
    kind = _BY_NAME.get(name.strip().lower())
    if kind is None:
        known = ", ".join(
            "/".join(dict.fromkeys([k.KIND.lower(), k.PLURAL, *k.SHORT_NAMES]))
            for k in KINDS.values()
        )
        raise Invalid(f"unknown kind {name!r}; known kinds: {known}", field="kind")
    return kind
