"""The exceptions genq raises; api/errors.py maps each to an HTTP status."""

from __future__ import annotations


class GenqError(Exception):
    """Base: a code, a message and, when one field is to blame, its name."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code:
            self.code = code


class InvalidSpec(GenqError):
    status = 422
    code = "invalid_spec"


class NotFound(GenqError):
    status = 404
    code = "not_found"


class Conflict(GenqError):
    status = 409
    code = "conflict"


class Unauthorized(GenqError):
    status = 401
    code = "invalid_api_key"


class TooLarge(GenqError):
    status = 413
    code = "too_large"


class RateLimited(GenqError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(GenqError):
    status = 503
    code = "unavailable"


class Cancelled(Exception):
    """A job noticed its cancel flag and stopped."""


class RetryableError(Exception):
    """A transient failure: the job is re-queued while attempts remain."""

    code = "transient"
