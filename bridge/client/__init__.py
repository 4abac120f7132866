"""A small async client for both sides of queue-bridge.

    async with Engine.connect(url, owner="tenant-a") as engine:       # the workflow engine side
        task_id = await engine.add("billing", {"invoice": 42}, token={"processId": "p1"})

    async with Worker.connect(url, service="billing", worker_id="w1") as worker:
        async for task in worker:                                      # fetch until cancelled
            await task.ack({"paid": True})                             # or: await task.fail({...})

Errors of the wire contract arrive as :class:`BridgeClientError` subclasses.
"""

from bridge.client.errors import (
    BadRequestError,
    BridgeClientError,
    PayloadTooLargeError,
    RequestTimeout,
    UnauthorizedError,
    UnavailableError,
)
from bridge.client.rpc import Engine, RpcClient, Task, Worker

__all__ = [
    "BadRequestError",
    "BridgeClientError",
    "Engine",
    "PayloadTooLargeError",
    "RequestTimeout",
    "RpcClient",
    "Task",
    "UnauthorizedError",
    "UnavailableError",
    "Worker",
]
