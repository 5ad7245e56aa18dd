"""Resolving secret references (webhook secrets, git credentials) at the moment of use.

A secret's value is never stored in an object, a status or a log: objects hold only where it
lives (``from_env`` in the controller's environment, or ``from_nomad_variable``), and it is read
each time it is needed, so rotating it needs no re-apply.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from nomad_pipeline.errors import Invalid, NotFound
from nomad_pipeline.nomad.client import NomadClient
from nomad_pipeline.resources.kinds import SecretRef


class SecretResolver:
    def __init__(
        self, nomad: NomadClient | None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        self._nomad = nomad
        self._environ = os.environ if environ is None else environ

    async def resolve(self, ref: SecretRef, *, field: str) -> str:
        """The secret's value; Invalid naming ``field`` and the reference when it is missing."""
        if ref.from_env is not None:
            value = self._environ.get(ref.from_env)
            if not value:
                raise Invalid(
                    f"secret environment variable {ref.from_env} is not set on the controller",
                    field=field,
                )
            return value
        variable = ref.from_nomad_variable
        assert variable is not None  # SecretRef guarantees exactly one source
        where = f"Nomad variable {variable.namespace}/{variable.path} key {variable.key!r}"
        if self._nomad is None:
            raise Invalid(f"{where}: no Nomad client configured", field=field)
        try:
            found = await self._nomad.get_variable(variable.path, namespace=variable.namespace)
        except NotFound:
            raise Invalid(f"secret {where} does not exist", field=field) from None
        value = (found.get("Items") or {}).get(variable.key)
        if not value:
            raise Invalid(f"secret {where} is missing or empty", field=field)
        return str(value)
