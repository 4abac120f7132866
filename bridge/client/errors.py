"""The wire contract's error codes as exceptions."""

from __future__ import annotations


class BridgeClientError(Exception):
    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequestError(BridgeClientError):
    code = "bad_request"


class PayloadTooLargeError(BridgeClientError):
    code = "payload_too_large"


class UnauthorizedError(BridgeClientError):
    code = "unauthorized"


class UnavailableError(BridgeClientError):
    code = "unavailable"


class UnknownOwnerError(BridgeClientError):
    code = "unknown_owner"


class IntegrityError(BridgeClientError):
    """The task's stored ciphertext failed authentication; the bridge dead-lettered it."""

    code = "integrity_error"


class InternalError(BridgeClientError):
    code = "internal"


class RequestTimeout(BridgeClientError):
    code = "timeout"


_BY_CODE: dict[str, type[BridgeClientError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        PayloadTooLargeError,
        UnauthorizedError,
        UnavailableError,
        UnknownOwnerError,
        IntegrityError,
        InternalError,
    )
}


def error_from_reply(error: object) -> BridgeClientError:
    if isinstance(error, dict):
        code = str(error.get("code", "error"))
        message = str(error.get("message", ""))
    else:
        code, message = "error", str(error)
    return _BY_CODE.get(code, BridgeClientError)(message, code)
