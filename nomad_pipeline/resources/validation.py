"""Turning pydantic's validation errors into one ``Invalid`` that names file, document and field.

Cross-field checks (a step's ``needs`` naming a missing step, a cycle) run in a model validator,
where pydantic only knows the model's own location; they raise :class:`FieldError` carrying the
path below that model, and :func:`invalid_from` appends it so the user sees
``spec.inline.steps[1].needs[0]`` rather than ``spec``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from nomad_pipeline.errors import Invalid

Location = Sequence[str | int]


class FieldError(ValueError):
    """A validation failure at ``path`` relative to the model whose validator raised it."""

    def __init__(self, path: Location, message: str) -> None:
        super().__init__(message)
        self.path = tuple(path)
        self.message = message


def field_path(location: Location) -> str:
    """``("spec", "steps", 1, "run")`` → ``spec.steps[1].run``."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _message(error: dict[str, object]) -> str:
    kind = error.get("type")
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown field"
    context = error.get("ctx")
    if isinstance(context, dict) and isinstance(context.get("error"), ValueError):
        return str(context["error"])
    message = str(error.get("msg", "invalid"))
    return message[:1].lower() + message[1:]


def invalid_from(error: ValidationError, *, prefix: str = "", base: Location = ()) -> Invalid:
    """One Invalid listing every problem as ``<prefix>: <field>: <message>``.

    ``field`` of the result is the first problem's path, for the API's error body.
    """
    problems: list[str] = []
    first_field: str | None = None
    for item in error.errors():
        location: list[str | int] = [*base, *item["loc"]]
        context = item.get("ctx")
        if isinstance(context, dict) and isinstance(context.get("error"), FieldError):
            location.extend(context["error"].path)
        path = field_path(location)
        first_field = first_field if first_field is not None else path
        problems.append(f"{path}: {_message(dict(item))}" if path else _message(dict(item)))
    lead = f"{prefix}: " if prefix else ""
    return Invalid(lead + "; ".join(problems), field=first_field or None)
