"""The reply bodies of the contract as pydantic models: the OpenAPI document's response schemas.

The replies themselves are built by :mod:`bridge.transport.wire` (for AMQP and HTTP alike); these
models only describe them, and tests check that what the wire module builds validates here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bridge.errors import ErrorCode


class _Reply(BaseModel):
    # Open, as the contract's replies are (1.10): a later version may add a field, and a client
    # generated from a closed schema refused every reply that carried one (found by review).
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class AddedTask(_Reply):
    id: str = Field(description="The task's id (a time UUID).")
    not_before: str | None = Field(
        None, alias="notBefore", description="When a delayed task may first be handed out (delayed adds only)."
    )


class AddReply(_Reply):
    result: Literal[True]
    task: AddedTask


class FetchedTask(_Reply):
    id: str = Field(description="The task's id: name it (with epoch) in ack, extend and fail.")
    epoch: int = Field(description="The lease's fencing token.")
    deliveries: int = Field(description="How often the task was handed out, this time included.")
    lease_expires_at: str = Field(alias="leaseExpiresAt", description="The lease's deadline (ISO 8601, UTC).")
    has_token: bool = Field(alias="hasToken", description="Echo it in the ack (lets the bridge complete faster).")


class FetchReply(_Reply):
    result: Any = Field(
        description="The task's value as added, which may itself be null; null when no task is ready. "
        "Test for `task`, not for a null `result`."
    )
    task: FetchedTask | None = Field(
        None, description="The task handed out: present exactly when a task was handed out (its value may be null)."
    )


class BoolReply(_Reply):
    result: bool


class ExtendedTask(_Reply):
    id: str
    epoch: int
    lease_expires_at: str = Field(alias="leaseExpiresAt")


class ExtendReply(_Reply):
    result: bool = Field(description="false: the worker does not hold that lease (any more).")
    task: ExtendedTask | None = None


class FailedTask(_Reply):
    id: str
    deliveries: int
    parked: bool = Field(description="true: the task reached its delivery limit and is parked.")
    retry_at: str | None = Field(alias="retryAt", description="When it is handed out again (null when parked).")


class FailReply(_Reply):
    result: bool
    task: FailedTask | None = None


class Purged(_Reply):
    purged: int = Field(description="Ready tasks cancelled.")
    more: bool = Field(
        description="true: this round stopped at its bound and more ready tasks may remain; send it again "
        "while a round purges something."
    )


class PurgeReply(_Reply):
    result: Purged


class ServiceStats(_Reply):
    service_id: str = Field(alias="serviceId")
    ready: int
    in_flight: int = Field(alias="inFlight")
    delayed: int
    parked: int
    oldest_ready_age_ms: int | None = Field(alias="oldestReadyAgeMs")


class Services(_Reply):
    services: list[ServiceStats]
    # Of every service: those whose counts could not be read now (left out of ``services``);
    # absent when every one was read.
    unavailable: list[str] | None = None


class StatsReply(_Reply):
    result: Services


class ParkedInfo(_Reply):
    id: str
    deliveries: int
    reason: str = Field(description="delivery_limit, failed or key_missing.")
    last_error: Any = Field(alias="lastError", description="The last fail's error, null if none.")
    parked_at: str = Field(alias="parkedAt")
    added_at: str = Field(alias="addedAt")
    has_token: bool = Field(alias="hasToken")
    last_error_omitted: bool | None = Field(
        None,
        alias="lastErrorOmitted",
        description="(1.7) Present (true) when this task's error, if any, was left out: the errors "
        "listed before it filled the reply's budget (4 MiB, or one largest value if more).",
    )


class ParkedList(_Reply):
    tasks: list[ParkedInfo]
    after: str | None = Field(
        None,
        description="(1.11; always present from 1.11) Where the listing stopped short of the parked index's end "
        "(limit tasks listed, or the request's share of the index read): more may be parked; send it back as "
        "after for the next page. null: it read to the end. Pages follow task ids, not park times: a task "
        "parked behind the cursor while pages were read is in none of the later pages.",
    )


class ParkedReply(_Reply):
    result: ParkedList


class Redriven(_Reply):
    redriven: int
    parked_before: str | None = Field(
        None,
        alias="parkedBefore",
        description="(1.9, all: true only) The bound this request used (ISO 8601, UTC): tasks parked before it "
        "were put back. Send it back as parkedBefore (with after, if given) until a reply has no after.",
    )
    after: str | None = Field(
        None,
        description="(1.9, all: true only) Present when the request stopped short: the parked-index row to go "
        "on after; send it back as after.",
    )


class RedriveReply(_Reply):
    result: Redriven


class Discarded(_Reply):
    discarded: int


class DiscardReply(_Reply):
    result: Discarded


class ErrorDetail(_Reply):
    code: ErrorCode
    message: str


class ErrorReply(_Reply):
    error: ErrorDetail
