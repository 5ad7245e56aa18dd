"""One error hierarchy for the whole project.

Third-party exceptions are translated into these once, at the edge (``nomad/``, ``store/``).
The API maps them to HTTP codes with a JSON body ``{"error": {"code", "reason", "message",
"field"}}`` and the CLI prints ``error: <reason>: <message>``.
"""

from __future__ import annotations


class NomadPipelineError(Exception):
    """Base of every error we raise on purpose."""

    http_status = 500
    reason = "InternalError"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {
            "code": self.http_status,
            "reason": self.reason,
            "message": self.message,
        }
        if self.field is not None:
            body["field"] = self.field
        return body


class NotFound(NomadPipelineError):
    http_status = 404
    reason = "NotFound"


class Conflict(NomadPipelineError):
    """A precondition failed: stale resource_version, name taken, object still in use."""

    http_status = 409
    reason = "Conflict"


class AlreadyExists(Conflict):
    reason = "AlreadyExists"


class Invalid(NomadPipelineError):
    """The input is wrong; ``field`` names where (``spec.inline.steps[1].run``)."""

    http_status = 400
    reason = "Invalid"


class Gone(NomadPipelineError):
    """A watch asked for a resource version older than what is kept: re-list."""

    http_status = 410
    reason = "Expired"


class TooLarge(Invalid):
    http_status = 413
    reason = "TooLarge"


class Unauthorized(NomadPipelineError):
    http_status = 401
    reason = "Unauthorized"


class Forbidden(NomadPipelineError):
    """Nomad refused the request's token (ACL): 403 ``Permission denied``."""

    http_status = 403
    reason = "Forbidden"


class NomadUnavailable(NomadPipelineError):
    """Nomad could not be reached or answered 5xx for a reason worth retrying."""

    http_status = 503
    reason = "NomadUnavailable"


class NomadError(NomadPipelineError):
    """Nomad answered with an error that retrying will not fix (its text is kept)."""

    http_status = 502
    reason = "NomadError"

    def __init__(self, message: str, *, status: int, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.status = status


class TerminalError(NomadPipelineError):
    """Retrying cannot help; surfaced as a condition on the object, never requeued."""

    reason = "TerminalError"
