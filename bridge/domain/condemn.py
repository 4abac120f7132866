"""A task that can never be handed out: its stored value fails authentication (tampered with, or
sealed under another owner, service or task). It is dead-lettered, kept until its TTL for
inspection, and the worker that met it moves on.

A task with a token is the engine's too: its workflow waits for a result or an error. The engine
is told with an ``integrity_error`` result, written ahead in the outbox like a park's
``delivery_limit`` and published once the kill applied. Told nothing, the workflow waited for ever
(a review found it).
"""

from __future__ import annotations

import logging
import uuid

from bridge.domain import jsonvalue
from bridge.domain.context import QueueContext
from bridge.domain.errors import KeysUnavailable
from bridge.domain.records import OutboxEntry, QueueKey
from bridge.domain.relay import ResultRelay, decided_by_itself
from bridge.domain.sealing import seal_outcome
from bridge.domain.timeline import outbox_bucket, timeuuid_from_ms
from bridge.errors import BridgeError, ErrorCode

log = logging.getLogger("bridge.queue")

INTEGRITY_MESSAGE = "the task's stored value failed authentication: it was never handed out, and never will be"


async def condemn(
    ctx: QueueContext,
    relay: ResultRelay,
    q: QueueKey,
    task_id: uuid.UUID,
    epoch: int,
    worker: str,
    *,
    has_token: bool,
) -> bool:
    """Dead-letter the task ``worker`` holds at ``epoch``; tell its engine (a token). Whether the
    kill applied (it counts the task out of flight)."""
    now = ctx.clock.now_ms()
    kill_id = timeuuid_from_ms(now)  # time-based, as a park's: the engine's result says when
    intent = await _owed(ctx, q, task_id, kill_id, now) if has_token else None
    killed = await ctx.store.kill(q, task_id, epoch, worker, now, kill_id)
    if not killed and intent is not None and await decided_by_itself(ctx, intent):
        killed = True  # refused by its own first copy (a driver's resend)
    if intent is not None:
        if killed:
            ctx.background.spawn(relay.publish_soon(intent), "publish integrity_error")
        else:
            await ctx.store.mark_published(intent)  # void: another bridge decided the task first
    return killed


async def _owed(ctx: QueueContext, q: QueueKey, task_id: uuid.UUID, kill_id: uuid.UUID, now: int) -> OutboxEntry | None:
    """The engine's ``integrity_error`` result, written ahead; None if the owner's key cannot seal
    it now (the task is dead-lettered all the same: the worker must move on)."""
    try:
        key = await ctx.keys.current(q.owner)
    except KeysUnavailable:
        # Passing (the key server slow or away): raised before the kill, so that the worker's
        # retry dead-letters it with its result then. Killed now, the engine was never told.
        raise
    except BridgeError as exc:  # the owner has no key any more: nothing can be sealed for it
        log.error("integrity_error of task %s not sent to the engine: %s", task_id, exc.message)
        return None
    outcome = {"error": {"code": ErrorCode.INTEGRITY_ERROR.value, "message": INTEGRITY_MESSAGE}}
    sealed = seal_outcome(key, q, task_id, jsonvalue.dumps(outcome))
    # The bucket it is written in, after the key lookup (see ``Acking._complete``).
    intent = OutboxEntry(outbox_bucket(ctx.clock.now_ms()), q, task_id, kill_id, sealed, False)
    await ctx.store.insert_outbox(intent)
    return intent
