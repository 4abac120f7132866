"""A small async client for both sides of queue-bridge.

    async with Engine.connect(url, owner="tenant-a") as engine:       # the workflow engine side
        task_id = await engine.add("billing", {"invoice": 42}, token={"processId": "p1"})

    async with Worker.connect(url, service="billing", worker_id="w1") as worker:
        async for task in worker:                                      # fetch until cancelled
            await task.ack({"paid": True})                             # or: await task.ack_error({...})

A task that may outlive its lease keeps it with ``async with task.keep_alive(): ...``; a failure to
do the work (not a business error) gives it back with ``await task.fail(...)``, to come again
after a backoff or be parked at its delivery limit. The engine side also manages its queues:
``cancel``, ``purge``, ``stats``, ``parked``, ``redrive``, ``discard`` (contract 1.4).

Errors of the wire contract arrive as :class:`BridgeClientError` subclasses; no reply at all
(a timeout, a lost connection) as :class:`TransportError`: retry the request (an add only with
a ``message_id``: retried without one, it may be stored twice).
"""

from bridge.client.errors import (
    BadRequestError,
    BridgeClientError,
    BrokerRefused,
    ConnectionLost,
    IntegrityError,
    InternalError,
    PayloadTooLargeError,
    RequestTimeout,
    TransportError,
    UnauthorizedError,
    UnavailableError,
    UnknownOwnerError,
)
from bridge.client.rpc import (
    Engine,
    FailOutcome,
    ParkedPage,
    ParkedTask,
    RpcClient,
    ServiceStats,
    Task,
    TaskError,
    Worker,
)

__all__ = [
    "BadRequestError",
    "BridgeClientError",
    "BrokerRefused",
    "ConnectionLost",
    "Engine",
    "FailOutcome",
    "IntegrityError",
    "InternalError",
    "ParkedPage",
    "ParkedTask",
    "PayloadTooLargeError",
    "RequestTimeout",
    "RpcClient",
    "ServiceStats",
    "Task",
    "TaskError",
    "TransportError",
    "UnauthorizedError",
    "UnavailableError",
    "UnknownOwnerError",
    "Worker",
]
