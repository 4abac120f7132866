"""The three requests of wire contract v1, validated strictly (no silent coercion of types)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.domain.errors import BadRequest

MAX_DELIVERIES_LIMIT = 1000
MAX_RETRY_IN_MS = 86_400_000  # a day


def a_task_id(value: uuid.UUID) -> uuid.UUID:
    """Task ids are time UUIDs (version 1) the bridge made: another UUID can name no task, and
    Cassandra's ``timeuuid`` columns refuse one (a 500 found by the HTTP gateway's fuzzing)."""
    if value.version != 1:
        raise ValueError("is not a task id (a version-1 time UUID from an add reply)")
    return value


def _fits_routing_key(value: str) -> str:
    # The serviceId is the routing key of result messages, which AMQP limits to 255 bytes.
    if len(value.encode()) > 255:
        raise ValueError("must be at most 255 bytes in UTF-8")
    return value


Identifier = Annotated[
    StrictStr,
    Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f]+$"),
    AfterValidator(_fits_routing_key),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class AddCommand(_Request):
    service_id: Identifier = Field(alias="serviceId")
    value: Any = Field(...)  # any JSON value, null included
    token: Any = None
    # 1.4: a delayed task (never handed out before then): a delay, or a time with its offset.
    delay_ms: StrictInt | None = Field(None, alias="delayMs", ge=0)
    not_before: StrictStr | None = Field(None, alias="notBefore", max_length=64)
    # 1.4: this task's delivery limit (else its service's): parked once delivered this often unacked.
    max_deliveries: StrictInt | None = Field(None, alias="maxDeliveries", ge=1, le=MAX_DELIVERIES_LIMIT)
    # 1.4: 0 (default) to 3; a ready task of a higher priority is handed out first (FIFO within one).
    priority: StrictInt = Field(0, ge=0, le=3)

    @field_validator("not_before")
    @classmethod
    def _is_an_instant(cls, value: str | None) -> str | None:
        if value is not None:
            instant(value, round_up=True)  # as ``due_ms`` reads it (a last instant's fraction is past the range)
        return value

    @model_validator(mode="after")
    def _one_way_to_delay(self) -> AddCommand:
        if self.delay_ms is not None and self.not_before is not None:
            raise ValueError("give delayMs or notBefore, not both")
        return self

    def due_ms(self, now_ms: int) -> int | None:
        """When the task may first be handed out, if later than now."""
        if self.delay_ms:
            return now_ms + self.delay_ms
        if self.not_before is not None:
            due = instant(self.not_before, round_up=True)
            return due if due > now_ms else None
        return None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# The times the contract can name: those a datetime holds in UTC (years 1 to 9999), which every
# reply that writes one back (``wire.iso``) can write.
FIRST_INSTANT_MS = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _MS
LAST_INSTANT_MS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _MS


def instant(text: str, *, round_up: bool = False) -> int:
    """An ISO 8601 time with its UTC offset, as milliseconds since the epoch (exact: no float);
    ``round_up`` for a time nothing may come before (a ``notBefore``: ``...00.0009Z`` floored was
    due, and could be handed out, up to a millisecond early; found by review, 2026-12-07).

    Its UTC time must fall in years 1 to 9999: ``9999-12-31T23:59:59-23:59`` parses (its offset
    applies only when it is converted) but is in year 10000 in UTC. Taken, it went through a
    request (a ``redrive all`` put tasks back with it as its bound) whose reply then could not
    write it back: ``internal`` for work done."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("must be an ISO 8601 time, e.g. 2026-12-02T10:00:00Z") from None
    if parsed.tzinfo is None:
        raise ValueError("must carry a UTC offset (Z or +hh:mm)")
    ms = (parsed - _EPOCH) // _MS  # aware datetimes subtract in UTC, with no range to overflow
    if round_up and (parsed - _EPOCH) % _MS:
        ms += 1
    if not FIRST_INSTANT_MS <= ms <= LAST_INSTANT_MS:
        raise ValueError("must be a time from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z in UTC")
    return ms


class FetchRequest(_Request):
    service_id: Identifier = Field(alias="serviceId")
    worker_id: Identifier = Field(alias="workerId")
    time_to_recover: StrictInt | None = Field(None, alias="timeToRecover", ge=100)
    # Long-poll: wait up to this long for a task when none is ready (0: answer at once, as in 1.0).
    wait_ms: StrictInt = Field(0, alias="waitMs", ge=0, le=30_000)
    # The worker holds no task of this queue: it acked (or was refused) the last one it was handed
    # and this is not a retry of a fetch whose reply was lost. The bridge then skips looking up the
    # task the worker holds (1.3). A worker that says so wrongly only delays its own held task,
    # which comes back to the queue when its lease runs out.
    fresh: StrictBool = False


class AckRequest(_Request):
    service_id: Identifier = Field(alias="serviceId")
    worker_id: Identifier = Field(alias="workerId")
    # The task being acked, from the fetch reply (``task.id``, ``task.epoch``). With it the ack
    # completes exactly that task or answers false; without it (clients of contract v1.0) it
    # applies to the task the worker holds now.
    task_id: uuid.UUID | None = Field(None, alias="taskId")
    epoch: StrictInt | None = Field(None, ge=1, le=2**31 - 1)
    # The fetch reply's ``task.hasToken``, echoed (1.3): with ``hasToken: false`` (and taskId and
    # epoch) the bridge completes the task in one compare-and-set, reading nothing first. Only a
    # hint: the lease records whether the task has a token, and the condition checks it.
    has_token: StrictBool | None = Field(None, alias="hasToken")
    result: Any = None
    error: Any = None

    @field_validator("task_id", mode="before")
    @classmethod
    def _task_id_is_a_string(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError("must be a string (the task.id of the fetch reply)")
        return value

    @field_validator("task_id")
    @classmethod
    def _task_id_is_a_time_uuid(cls, value: uuid.UUID | None) -> uuid.UUID | None:
        return None if value is None else a_task_id(value)

    @property
    def outcome(self) -> dict[str, Any]:
        """What goes back to the engine. Falsy results (0, false, "") are results."""
        if "error" in self.model_fields_set and self.error is not None:
            return {"error": self.error}
        return {"result": self.result}


class NextFetch(_Request):
    """(1.6) An ack's ``next``: fetch the worker's next task right after the ack, in the same
    round trip, as a fetch of the same worker would (never waiting: the ack's answer does not
    wait for a task). One request a task for a busy worker instead of two."""

    time_to_recover: StrictInt | None = Field(None, alias="timeToRecover", ge=100)
    # As the fetch's: the worker held nothing but the task this ack is for, and this is no retry
    # of an ack whose reply was lost. Applies only when the ack is answered true.
    fresh: StrictBool = False


class AckWithNextRequest(AckRequest):
    """The ack as AMQP takes it (1.6): with ``next``, its reply carries the next task as well."""

    next: NextFetch | None = None

    def next_fetch(self, acked: bool) -> FetchRequest:
        """The fetch ``next`` asks for, once the ack was answered ``acked``."""
        assert self.next is not None
        return FetchRequest.model_validate(
            {
                "serviceId": self.service_id,
                "workerId": self.worker_id,
                "timeToRecover": self.next.time_to_recover,
                "fresh": acked and self.next.fresh,
            }
        )


class _Named(_Request):
    """A worker's request about the task it holds: that task, or exactly ``taskId``/``epoch``."""

    service_id: Identifier = Field(alias="serviceId")
    worker_id: Identifier = Field(alias="workerId")
    task_id: uuid.UUID | None = Field(None, alias="taskId")
    epoch: StrictInt | None = Field(None, ge=1, le=2**31 - 1)

    @field_validator("task_id", mode="before")
    @classmethod
    def _task_id_is_a_string(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError("must be a string (the task.id of the fetch reply)")
        return value

    @field_validator("task_id")
    @classmethod
    def _task_id_is_a_time_uuid(cls, value: uuid.UUID | None) -> uuid.UUID | None:
        return None if value is None else a_task_id(value)


class ExtendRequest(_Named):
    time_to_recover: StrictInt | None = Field(None, alias="timeToRecover", ge=100)


class FailRequest(_Named):
    error: Any = None
    retry_in_ms: StrictInt | None = Field(None, alias="retryInMs", ge=0, le=MAX_RETRY_IN_MS)


TaskId = Annotated[StrictStr, AfterValidator(lambda v: str(a_task_id(uuid.UUID(v))))]


class CancelRequest(_Request):
    service_id: Identifier = Field(alias="serviceId")
    task_id: TaskId = Field(alias="taskId")


class QueueRequest(_Request):
    """purge: the queue alone."""

    service_id: Identifier = Field(alias="serviceId")


class StatsRequest(_Request):
    service_id: Identifier | None = Field(None, alias="serviceId")
    # 1.10: of every queue, answer those that can be read and name the others in ``unavailable``;
    # without it, one queue that cannot be read makes the request ``unavailable`` (as in 1.9, which
    # clients of 1.4-1.9 retry: a partial answer they would read as queues gone or empty).
    partial: StrictBool = Field(
        False,
        description="(1.10) Of every queue only (no serviceId): answer those whose counts can be read and "
        "name the others in unavailable; else one that cannot be read makes the request unavailable.",
    )


class ParkedRequest(_Request):
    service_id: Identifier = Field(alias="serviceId")
    limit: StrictInt = Field(100, ge=1, le=1000)
    # (1.11) Go on after this parked-index row (an earlier reply's ``after``).
    after: TaskId | None = None


class RedriveRequest(_Request):
    service_id: Identifier = Field(alias="serviceId")
    task_ids: list[TaskId] | None = Field(None, alias="taskIds", max_length=1000)
    all: StrictBool = False
    # (1.9, ``all`` only) Tasks parked before this time (the bound an earlier reply gave): those
    # parked again since are left, so that a client sending it back ends. Absent: the bridge's now.
    parked_before: StrictStr | None = Field(None, alias="parkedBefore", max_length=64)
    # (1.9, ``all`` only) Go on after this parked-index row (an earlier reply's ``after``).
    after: TaskId | None = None

    @field_validator("parked_before")
    @classmethod
    def _is_an_instant(cls, value: str | None) -> str | None:
        if value is not None:
            instant(value)
        return value

    @model_validator(mode="after")
    def _which(self) -> RedriveRequest:
        if (self.task_ids is None) == (not self.all):
            raise ValueError("give taskIds or all: true (one of them)")
        if not self.all and (self.parked_before is not None or self.after is not None):
            raise ValueError("parkedBefore and after go with all: true")
        return self

    def parked_before_ms(self) -> int | None:
        return None if self.parked_before is None else instant(self.parked_before)


class DiscardRequest(_Request):
    service_id: Identifier = Field(alias="serviceId")
    task_ids: list[TaskId] = Field(alias="taskIds", min_length=1, max_length=1000)


def parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in err["loc"]) or "body"
            problems.append(f"{where}: {err['msg']}")
        raise BadRequest("; ".join(problems)) from None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A task handed to a worker."""

    task_id: str
    value_json: bytes  # the value as added, JSON (decrypted, not parsed)
    deliveries: int
    epoch: int  # the fencing token of this lease: an ack naming an older epoch is refused
    lease_expires_at_ms: int
    traceparent: str | None
    has_token: bool = False  # its result goes to the engine
