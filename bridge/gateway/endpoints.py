"""The gateway's endpoints: one per method of the AMQP contract, with its request and reply models.

Served by :mod:`bridge.gateway.server` and described by :mod:`bridge.gateway.openapi` from this
one table. Every endpoint is ``POST /api/queue/{serviceId}/<name>`` with the AMQP request body
(``serviceId`` from the path), plus ``GET /api/queue/stats`` (every service of the caller).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from bridge.domain.models import AckRequest, AddCommand, FetchRequest
from bridge.gateway import replies
from bridge.transport.wire import LIFECYCLE

API_PREFIX = "/api/queue"
SERVICE_PATH = API_PREFIX + "/{serviceId}"
STATS_ALL_PATH = API_PREFIX + "/stats"
OPENAPI_PATH = "/openapi.json"


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str  # the contract's method (the AMQP routing key)
    name: str  # the last path segment
    model: type[BaseModel]  # the request, as the AMQP handlers parse it
    reply: type[BaseModel]  # what a 200 answers (for the OpenAPI document)
    summary: str

    @property
    def path(self) -> str:
        return f"{SERVICE_PATH}/{self.name}"


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("add", "tasks", AddCommand, replies.AddReply, "Add a task (engine)"),
    Endpoint("fetch", "fetch", FetchRequest, replies.FetchReply, "Fetch the next task, leased to the worker"),
    Endpoint("ack", "ack", AckRequest, replies.BoolReply, "Complete the task the worker holds (result or error)"),
    Endpoint("extend", "extend", LIFECYCLE["extend"].model, replies.ExtendReply, "Renew the worker's lease"),
    Endpoint("fail", "fail", LIFECYCLE["fail"].model, replies.FailReply, "Give the task back after a backoff"),
    Endpoint("cancel", "cancel", LIFECYCLE["cancel"].model, replies.BoolReply, "Cancel a task (engine)"),
    Endpoint("purge", "purge", LIFECYCLE["purge"].model, replies.PurgeReply, "Cancel every ready task"),
    Endpoint("stats", "stats", LIFECYCLE["stats"].model, replies.StatsReply, "Counts of the service's queue"),
    Endpoint("parked", "parked", LIFECYCLE["parked"].model, replies.ParkedReply, "List parked tasks"),
    Endpoint("redrive", "redrive", LIFECYCLE["redrive"].model, replies.RedriveReply, "Put parked tasks back"),
    Endpoint("discard", "discard", LIFECYCLE["discard"].model, replies.DiscardReply, "Drop parked tasks"),
)
STATS_ALL = Endpoint("stats", "", LIFECYCLE["stats"].model, replies.StatsReply, "Counts of every service of the caller")
