"""What happens to a request's AMQP message, for every outcome: one table, applied in one place
(:func:`settle`, called by :class:`~bridge.transport.handlers.RequestHandlers` for add, fetch and
ack alike, and by the transport's last resort).

| outcome | add | fetch, ack (and unknown methods) |
|---|---|---|
| `ok` | reply, ack | reply, ack |
| `expired` | (adds carry no deadline) | no reply, ack |
| `bad_request` | reply, **dead-letter** | reply, **dead-letter** |
| `payload_too_large` | reply, **dead-letter** | reply, **dead-letter** |
| `unauthorized` | reply, **dead-letter** | reply, **dead-letter** |
| `unknown_owner` | reply, **dead-letter** | reply, **dead-letter** |
| `integrity_error` | reply, **dead-letter** | reply, **dead-letter** |
| `internal` | reply, **dead-letter** | reply, **dead-letter** |
| `unavailable` | retry up to 30 s, then no reply, **requeue** | reply, ack |

(:func:`markdown_table` renders it from :data:`FATES`; README.md and docs/asyncapi.yaml carry the
same rendering, and tests/unit/test_error_model.py keeps the three equal.) "reply" means an answer
to the request's ``reply_to`` when it has one; ``expired`` is an RPC received after its
``x-deadline``, dropped unexecuted.

The rule: an outcome that delivering the same message again cannot change (the caller's mistake,
a refused owner, data that fails authentication, a bug) is answered and dead-lettered: RabbitMQ
keeps the message unchanged, with ``x-death`` headers, in ``<prefix>.dead-letter``; nothing is
requeued forever and nothing is dropped. ``unavailable`` (Cassandra or the key provider down) is
the one retryable code. An add is a command that nobody may be waiting for, so the bridge retries
it with backoff for up to 30 s while it holds the delivery, then hands it back to RabbitMQ (no
reply until it is over). An RPC has a caller waiting with a deadline who retries it, so it is
answered and acked: requeued, it would only run late.

Some RPCs are acknowledged before they are answered, so that they do not hold a prefetch slot
while they run: a long-poll fetch once its wait begins, a redrive as its pacing starts, a purge,
stats, parked or discard still running after a moment (``bridge.transport.handlers``). What can
refuse them without running anything (the request itself, the caller, an owner without a key) is
decided before that ack, so those refusals are dead-lettered as the table says; an error after it
(``integrity_error``, ``internal``, ``unavailable``) is answered only: the delivery is no longer
the bridge's to dead-letter (:func:`dead_letters`), and the answer does not say it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from bridge.errors import ErrorCode
from bridge.transport.request import RequestMessage

__all__ = ["EXPIRED", "FATES", "OK", "Fate", "Rule", "Settle", "dead_letters", "fate_of", "markdown_table", "settle"]

OK = "ok"
EXPIRED = "expired"
RETRY_BUDGET_S = 30.0  # how long an add is retried in place (its delivery held) before it is requeued


class Settle(StrEnum):
    ACK = "ack"  # basic.ack: done with it
    REQUEUE = "requeue"  # basic.nack(requeue=True): RabbitMQ delivers it again
    DEAD_LETTER = "dead-letter"  # basic.reject(requeue=False): to the dead-letter exchange


@dataclass(frozen=True, slots=True)
class Fate:
    reply: bool  # answer the request's reply_to (when it has one)
    settle: Settle
    retry: bool = False  # retried in place with backoff before it is settled

    def describe(self) -> str:
        settle = f"**{self.settle}**" if self.settle is not Settle.ACK else str(self.settle)
        what = ("reply" if self.reply else "no reply") + ", " + settle
        return f"retry up to {RETRY_BUDGET_S:g} s, then {what}" if self.retry else what


ANSWER = Fate(reply=True, settle=Settle.ACK)
REFUSE = Fate(reply=True, settle=Settle.DEAD_LETTER)
DROP = Fate(reply=False, settle=Settle.ACK)
RETRY_THEN_REQUEUE = Fate(reply=False, settle=Settle.REQUEUE, retry=True)


@dataclass(frozen=True, slots=True)
class Rule:
    add: Fate | None  # None: the outcome cannot happen to an add
    rpc: Fate  # fetch, ack, and requests for an unknown method


FATES: Mapping[str, Rule] = {
    OK: Rule(add=ANSWER, rpc=ANSWER),
    EXPIRED: Rule(add=None, rpc=DROP),  # adds carry no deadline
    ErrorCode.BAD_REQUEST: Rule(add=REFUSE, rpc=REFUSE),
    ErrorCode.PAYLOAD_TOO_LARGE: Rule(add=REFUSE, rpc=REFUSE),
    ErrorCode.UNAUTHORIZED: Rule(add=REFUSE, rpc=REFUSE),
    ErrorCode.UNKNOWN_OWNER: Rule(add=REFUSE, rpc=REFUSE),
    ErrorCode.INTEGRITY_ERROR: Rule(add=REFUSE, rpc=REFUSE),
    ErrorCode.INTERNAL: Rule(add=REFUSE, rpc=REFUSE),
    ErrorCode.UNAVAILABLE: Rule(add=RETRY_THEN_REQUEUE, rpc=ANSWER),
}


def fate_of(outcome: str, method: str) -> Fate:
    """The fate of a request of ``method`` (add, fetch, ack, or another) that ended in ``outcome``."""
    rule = FATES.get(outcome, FATES[ErrorCode.INTERNAL])
    return rule.add if method == "add" and rule.add is not None else rule.rpc


def markdown_table() -> str:
    """:data:`FATES` as the Markdown table of the docs."""
    lines = ["| outcome | add | fetch, ack (and unknown methods) |", "|---|---|---|"]
    for outcome, rule in FATES.items():
        add = rule.add.describe() if rule.add is not None else "(adds carry no deadline)"
        lines.append(f"| `{outcome}` | {add} | {rule.rpc.describe()} |")
    return "\n".join(lines)


def dead_letters(message: RequestMessage, fate: Fate) -> bool:
    """Whether :func:`settle` dead-letters ``message`` for ``fate``: not once it was acknowledged
    early (it is only answered then)."""
    return fate.settle is Settle.DEAD_LETTER and not message.processed


async def settle(message: RequestMessage, fate: Fate) -> None:
    """Acknowledge, requeue or dead-letter the delivery, as ``fate`` says (once: a delivery
    acknowledged early, a waiting fetch's when its wait begins, a redrive's, a long lifecycle
    request's, is not settled again, and its outcome is only answered)."""
    if message.processed:
        return
    if fate.settle is Settle.ACK:
        await message.ack()
    elif fate.settle is Settle.REQUEUE:
        await message.nack(requeue=True)
    else:
        await message.reject(requeue=False)  # -> dead-letter exchange, with x-death headers
