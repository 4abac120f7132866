"""HTTP statuses of the contract's error codes, and the gateway's own errors.

Every error answers ``{"error": {"code", "message"}}`` with one of the contract's codes
(:class:`bridge.errors.ErrorCode`); the status says the same for HTTP:

=====================  ======  ===========================================================
code                   status  when
=====================  ======  ===========================================================
``bad_request``        400     malformed JSON, wrong types, missing fields, a bad header
``bad_request``        404     no such path (405: wrong method, 415: a body that is not JSON)
``unauthorized``       401     no credentials, malformed ones, an unknown key, a wrong secret
``unauthorized``       403     valid key, not allowed (``X-Owner`` from a key that is not trusted)
``unknown_owner``      403     the owner has no encryption key
``payload_too_large``  413     the body (or the value in it) is over the limit
``integrity_error``    422     stored data failed authentication
``unavailable``        503     Cassandra or the key provider is down, or the bridge stops (``Retry-After``)
``internal``           500     a bug (logged; the reply never carries a traceback)
=====================  ======  ===========================================================
"""

from __future__ import annotations

from bridge.domain.errors import BadRequest, Unauthorized
from bridge.errors import ErrorCode, wire_code

STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.UNKNOWN_OWNER: 403,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.INTEGRITY_ERROR: 422,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class Unauthenticated(Unauthorized):
    """No credentials, or credentials that are not a valid key."""

    http_status = 401


class Forbidden(Unauthorized):
    """Valid credentials, not allowed: ``X-Owner`` naming another owner from a key that is not trusted."""

    http_status = 403


class NotFound(BadRequest):
    http_status = 404


class MethodNotAllowed(BadRequest):
    http_status = 405

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.allow = allow  # the Allow header


class UnsupportedMediaType(BadRequest):
    http_status = 415


class HttpError(BadRequest):
    """Any other client error the HTTP layer finds (its own status, code ``bad_request``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.http_status = status if 400 <= status < 500 else 400


def status_of(exc: BaseException) -> int:
    """The HTTP status that answers ``exc``: its own, else its wire code's (``internal``: 500)."""
    own = getattr(exc, "http_status", None)
    if isinstance(own, int):
        return own
    return STATUS[wire_code(exc)]
