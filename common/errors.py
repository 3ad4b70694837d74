"""The exceptions genq raises; api/errors.py maps each to an HTTP status."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from pydantic import ValidationError


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


class ModelNotFound(NotFound):
    """A model id (registered, or on the hub) that cannot be resolved: never retried."""

    code = "model_not_found"


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


# ---------------------------------------------------------------- model code


class DataError(ValueError):
    """The dataset spec or its files are unusable; the message lists every problem."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class InvalidRequests(ValueError):
    """Requests this model cannot serve: each key's problems, each naming its field."""

    def __init__(self, problems: dict[str, list[str]]):
        self.problems = problems
        super().__init__("; ".join(f"requests[{key}].{p}" for key, found in problems.items()
                                   for p in found))


class NanLoss(Exception):
    """The loss (or gradient norm) stopped being finite; the step is 1-based."""

    def __init__(self, step: int, value: float = math.nan, what: str = "loss"):
        super().__init__(f"{what} is {value} at step {step}")
        self.step = step


class InvalidTrainSpec(ValueError):
    """The spec cannot be trained as given; the message lists every problem."""


class CheckpointError(Exception):
    """A checkpoint directory is missing files or holds corrupt ones."""

    code = "checkpoint_unreadable"


class ConfigProblem(ValueError):
    """A cross-field problem raised by a config validator, reported on one field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownField(ConfigProblem):
    """A config key the family does not know (listed before the other problems)."""


class GpuUnreadable(Exception):
    """NVML is absent or could not read this GPU; the message is NVML's."""


# ---------------------------------------------------------------- stops


class StopReason(StrEnum):
    """Why a running job stops early (JobContext.should_stop); each has its exception."""

    lost = "lost"  # another attempt owns the job now
    cancel = "cancel"
    shutdown = "shutdown"
    timeout = "timeout"


class Stopped(Exception):  # noqa: N818 - a stop is an outcome, not an error
    """A job body stopped early; args[0] is its partial result (step, items done...)."""

    @property
    def partial(self) -> dict[str, Any]:
        return self.args[0] if self.args and isinstance(self.args[0], dict) else {}


class LeaseLost(Stopped):
    """The job's lease passed to another attempt: this one stops without a transition."""


class Cancelled(Stopped):
    """A job noticed its cancel flag and stopped."""


class ShutdownRequested(Stopped):
    """The worker is shutting down: the job checkpointed and goes back to the queue."""


class StopForTimeout(Stopped):
    """The job ran past spec.timeout_s (after checkpointing)."""


STOPS: dict[StopReason, type[Stopped]] = {
    StopReason.lost: LeaseLost, StopReason.cancel: Cancelled,
    StopReason.shutdown: ShutdownRequested, StopReason.timeout: StopForTimeout,
}


def raise_if_stopped(reason: StopReason | str | None, partial: dict[str, Any]) -> None:
    """Raise the stop's exception, carrying the partial result; nothing when reason is None."""
    if reason is not None:
        raise STOPS[StopReason(reason)](partial)


class RetryableError(Exception):
    """A transient failure: the job is re-queued while attempts remain."""

    code = "transient"


def pydantic_problems(exc: ValidationError) -> list[str]:
    """Each error of a pydantic validation as `field: message` (a whole-model check's own
    message already names its fields)."""
    problems = []
    for err in exc.errors():
        where = ""
        for part in err["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        message = str(err["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return problems


# ---------------------------------------------------------------- client and CLI


class GenqAPIError(Exception):
    """An error answer from the API: status, code, message and the field to blame."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(f"{message}" + (f" (field: {param})" if param else ""))
        self.status, self.code, self.message, self.param = status, code, message, param


class DemoFailed(RuntimeError):
    """The demo could not show what it promises; the message says which step failed."""


class StackError(RuntimeError):
    """A stack that cannot start, said in one line for a person."""
