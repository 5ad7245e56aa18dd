"""The Kubernetes-style envelope shared by every kind: apiVersion, kind, metadata, spec, status.

Field names are snake_case on the wire, as in the seed's object format. ``metadata`` fields that
the server owns (uid, generation, resource_version, creation_timestamp, deletion_timestamp) are
ignored on apply and set by the store.

Finalizers work as in Kubernetes: deleting an object whose ``metadata.finalizers`` is not empty
only sets ``deletion_timestamp``; the controllers named by the finalizers clean up, each removes
its own, and the store deletes the object once the list is empty (``store/interface.py``).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nomad_pipeline.resources import names
from nomad_pipeline.resources.validation import FieldError

# Defined in ``names`` (importable without pydantic, for the CLI); named here as well for the
# code that works with the models.
API_GROUP = names.API_GROUP
API_VERSION = names.API_VERSION

# DNS-1123-ish names as Kubernetes uses them, but also allowing the seed's underscores and dots
# (seed step ids such as "run_build" and variables such as "trigger.git_sha").
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,251}[a-z0-9])?$")
NAME_RULE = (
    "must be 1-253 lower-case letters, digits, '-', '_' or '.', starting and ending with a letter "
    "or digit"
)


class StrictModel(BaseModel):
    """Unknown fields are errors, never silently dropped (a misspelt key must be reported)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=False)


class ConditionStatus:
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StrictModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


class ObjectMeta(StrictModel):
    name: str
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Server-owned; ignored on apply except resource_version (an optimistic-concurrency guard).
    uid: str | None = None
    generation: int = 0
    resource_version: str | None = None
    creation_timestamp: datetime | None = None
    # Controllers that must clean up before the object goes (``nomad-pipeline.io/stop-jobs``).
    finalizers: list[str] = Field(default_factory=list)
    # Server-owned: when a delete was asked for while finalizers were pending.
    deletion_timestamp: datetime | None = None

    @property
    def deleting(self) -> bool:
        """Deletion was requested; the object waits for its finalizers to be removed."""
        return self.deletion_timestamp is not None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(f"{value!r} {NAME_RULE}")
        return value

    @field_validator("namespace")
    @classmethod
    def _valid_namespace(cls, value: str) -> str:
        # "" is how cluster-scoped objects (Namespaces) are stored; Resource checks which applies.
        if value and not NAME_PATTERN.match(value):
            raise ValueError(f"{value!r} {NAME_RULE}")
        return value


class Status(StrictModel):
    observed_generation: int = 0
    conditions: list[Condition] = Field(default_factory=list)

    def condition(self, condition_type: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == condition_type), None)

    def with_condition(self, condition: Condition) -> list[Condition]:
        """The conditions with ``condition`` replacing the one of its type (appended last).

        The transition time stays that of the current condition when its status is unchanged,
        so ``last_transition_time`` says when the status last flipped, not when it was written.
        """
        current = self.condition(condition.type)
        if current is not None and current.status == condition.status:
            condition = condition.model_copy(
                update={"last_transition_time": current.last_transition_time}
            )
        return [c for c in self.conditions if c.type != condition.type] + [condition]


def ready_condition(
    status: Literal["True", "False"], reason: str, message: str, now: datetime, generation: int
) -> Condition:
    """A ``Ready`` condition observed at ``now`` for the object's ``generation``."""
    return Condition(
        type="Ready",
        status=status,
        reason=reason,
        message=message,
        last_transition_time=now,
        observed_generation=generation,
    )


class Resource(StrictModel):
    """Base of every kind. Subclasses narrow ``spec`` and ``status`` and set ``KIND``; the
    other names come from ``names.KIND_NAMES``, their one home (the CLI reads it without
    loading these models)."""

    KIND: ClassVar[str] = ""
    PLURAL: ClassVar[str] = ""
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ()
    # Namespaces are cluster-scoped: their metadata.namespace is ignored and stored as "".
    NAMESPACED: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            kind_names = names.kind_names_for(cls.KIND)
            cls.PLURAL = kind_names.plural
            cls.SHORT_NAMES = kind_names.short_names
            cls.NAMESPACED = kind_names.namespaced

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str
    metadata: ObjectMeta
    spec: Any
    status: Any

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    @field_validator("api_version")
    @classmethod
    def _known_api_version(cls, value: str) -> str:
        if value != API_VERSION:
            raise ValueError(f"unsupported apiVersion {value!r}, expected {API_VERSION!r}")
        return value

    @model_validator(mode="after")
    def _scope(self) -> Self:
        if not self.NAMESPACED:
            self.metadata.namespace = ""
        elif not self.metadata.namespace:
            raise FieldError(("metadata", "namespace"), f"a {self.KIND} needs a namespace")
        return self

    @property
    def key(self) -> tuple[str, str]:
        return (self.metadata.namespace, self.metadata.name)

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict users see (apiVersion, kind, metadata, spec, status)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
