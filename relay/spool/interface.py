"""The Spool interface: what delivery needs from the store of accepted mail, and what the admin commands need.

The scheduler (relay/delivery/) and the queue commands (relay/admin/queue.py) talk to these protocols only,
never to a database: SQLite (relay/spool/sqlite.py), or PostgreSQL shared by several relays
(relay/spool/postgres.py). Replies are stored as Reply values, their fields in columns: nothing parses
reply text back.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from relay.core.activity import MessageRecord
from relay.core.policy import CopyKind
from relay.core.replies import RelayError, Reply
from relay.core.rewrite import OutgoingCopy


class CopyState(enum.StrEnum):
    QUEUED = "queued"
    SENDING = "sending"  # claimed until next_attempt, the end of its lease


class HistoryState(enum.StrEnum):
    """A copy's state in the history the console shows: while it waits, and after it left the spool."""

    QUEUED = "queued"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"  # tried, waiting for a retry
    BOUNCED = "bounced"
    HELD = "held"
    DISCARDED = "discarded"


class HeldState(enum.StrEnum):
    """What became of a message held for review (policy.action: hold)."""

    HELD = "held"
    RELEASED = "released"
    DISCARDED = "discarded"
    RETURNED = "returned"  # held past policy.hold_max_age: returned to the sender, not sent


# Upper bounds of the delivery time histogram, in seconds: from a quick relay to a day of retries.
DELIVERY_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)


def new_queue_id() -> str:
    return secrets.token_hex(6).upper()


class SpoolWriteError(RelayError):
    """The spool could not commit (disk full, read-only, I/O error): the client must try again later."""


def closed_spool_error() -> SpoolWriteError:
    # A client still in a session while the relay stops (SIGTERM): it keeps the message and tries again.
    return SpoolWriteError(451, "4.3.2", "The relay is shutting down; try again later")


class Progress(enum.Enum):
    """Where a message stands after an attempt's result is stored."""

    SENDING = "sending"  # copies left to send
    DELIVERED = "delivered"  # every copy delivered: the spool forgets the message, nothing is left to retire
    SETTLED = "settled"  # nothing left to send, failures to bounce: retire() comes next


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to store: its body once, and its copies as the pipeline made them (their bodies are this body)."""

    id: str
    mail_from: str
    smtputf8: bool
    body: bytes
    copies: tuple[OutgoingCopy, ...]
    received_at: float
    upstream: str | None = None
    is_bounce: bool = False
    # The first `claimed` copies are stored already claimed until claimed_until: first attempts sent from memory.
    claimed: int = 0
    claimed_until: float = 0.0
    # Kept in the history for the console; None for the relay's own messages (delivery reports, notices).
    record: MessageRecord | None = None

    @classmethod
    def to_sender(
        cls, sender: str, headers: bytes, body: bytes, now: float, upstream: str | None, kind: CopyKind
    ) -> NewMessage:
        """A message the relay writes to a sender (a delivery report, a notice): never bounced itself."""
        return cls(
            id=new_queue_id(),
            mail_from=sender,
            smtputf8=not sender.isascii(),
            body=body,
            copies=(OutgoingCopy((sender,), kind, headers, body),),
            received_at=now,
            upstream=upstream,
            is_bounce=True,
        )


@dataclass(frozen=True, slots=True)
class SpooledCopy:
    """A copy claimed for sending; its message's body is read apart (bodies()), once for all its copies."""

    id: int
    message_id: str
    position: int
    kind: CopyKind
    recipients: tuple[str, ...]
    headers: bytes
    mail_from: str
    smtputf8: bool
    upstream: str | None
    received_at: float
    attempts: int


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What one attempt changed: recipients done, recipients failed for good, recipients to retry."""

    copy_id: int
    delivered: tuple[str, ...] = ()
    failed: tuple[tuple[str, Reply], ...] = ()  # (recipient, the reply that refused it for good)
    retry: tuple[str, ...] = ()
    next_attempt: float = 0.0
    last_reply: Reply | None = None
    counts_as_attempt: bool = True
    sent_at: float = 0.0
    # False when the attempt never got an answer from the upstream (no connection, TLS, login): /metrics' upstream_up.
    reached_upstream: bool = True


@dataclass(frozen=True, slots=True)
class Failure:
    recipient: str
    reply: Reply
    headers: bytes


@dataclass(frozen=True, slots=True)
class SettledMessage:
    """A message with no copy left to send: what remains is to bounce its failures and forget it."""

    id: str
    mail_from: str
    upstream: str | None
    is_bounce: bool
    received_at: float
    failures: tuple[Failure, ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class CopySummary:
    id: int
    position: int
    kind: CopyKind
    recipients: tuple[str, ...]
    state: CopyState
    attempts: int
    next_attempt: float
    last_reply: Reply | None


@dataclass(frozen=True, slots=True)
class MessageSummary:
    id: str
    mail_from: str
    upstream: str | None
    is_bounce: bool
    received_at: float
    size: int
    copies: tuple[CopySummary, ...]
    failures: tuple[Failure, ...]


@dataclass(frozen=True, slots=True)
class CopyHistory:
    position: int
    recipients: tuple[str, ...]
    state: HistoryState
    attempts: int
    last_reply: Reply | None  # the upstream's 250 once delivered, else the reply that deferred or refused it
    next_attempt: float | None  # deferred copies: when the next attempt is due


@dataclass(frozen=True, slots=True)
class MessageHistory:
    id: str
    received_at: float
    record: MessageRecord
    copies: tuple[CopyHistory, ...]


@dataclass(frozen=True, slots=True)
class HeldMessage:
    id: str
    mail_from: str
    recipients: tuple[str, ...]
    smtputf8: bool
    received_at: float
    trace: dict[str, str]  # what the relay's Received line says, for the copies made at release
    state: HeldState
    data: bytes  # the message as received; empty once settled


@dataclass(frozen=True, slots=True)
class SpoolMetrics:
    """The spool's side of /metrics, read in one go."""

    counters: dict[tuple[str, str], float]  # (name, label) -> total since the spool was made
    queue_copies: dict[str, int]  # queued (never tried), deferred (tried, waiting), sending
    oldest_received_at: float | None  # of the messages with copies waiting
    held: int  # messages held for review


class SchedulerSpool(Protocol):
    """What delivery needs: store new mail, claim due copies, record attempts, retire settled messages."""

    async def store(
        self, message: NewMessage, committed: Callable[[tuple[int, ...]], None] | None = None
    ) -> tuple[int, ...]:
        """Commit the message and its copy plan durably; the copies' ids, in order. SpoolWriteError if it cannot.

        committed(ids), if given, runs as soon as the message is committed, while it is being made durable.
        """

    async def recover(self) -> int:
        """After a restart: copies that were being sent become due again; returns how many.

        For one relay per spool. Relays sharing a database would skip this and let claims run out instead.
        """

    async def claim_due(self, now: float, limit: int, lease: float) -> list[SpooledCopy]:
        """Up to limit due copies (queued ones, and claimed ones whose lease ran out), claimed until now + lease."""

    async def bodies(self, message_ids: Collection[str]) -> dict[str, bytes]:
        """The bodies of these messages, by id; a message deleted meanwhile is left out."""

    async def release(self, copy_id: int, next_attempt: float) -> None:
        """Put a claimed copy back unsent, without counting an attempt."""

    async def postpone(self, now: float, until: float) -> None:
        """Copies due now wait until then (a rate limit is reached), without counting an attempt."""

    async def record(self, result: CopyResult) -> Progress:
        """Store an attempt's outcome and say where its message stands.

        A message delivered to everyone is forgotten at once; one with failures waits for retire().
        """

    async def next_due(self) -> float | None:
        """When the next copy is due (or a claim runs out), if any."""

    async def settled(self, message_id: str | None = None) -> list[SettledMessage]:
        """Messages (or the one named) with no copy left to send."""

    async def retire(self, message_id: str, replacement: NewMessage | None) -> None:
        """Forget a settled message, storing its bounce (if any) in the same transaction."""

    async def recent_sends(self, since: float) -> list[tuple[float, int]]:
        """(time, recipients) of the transactions sent since then, for rate limits across restarts."""

    async def remember(self, message_id: str, received_at: float, record: MessageRecord) -> None:
        """Keep a message that was not stored (refused) in the history, and count its decision."""

    async def hold(self, message: HeldMessage, record: MessageRecord, notice: NewMessage | None) -> None:
        """Keep a message unsent until a person decides, with the notice to its sender; durable."""

    async def close(self) -> None: ...


@runtime_checkable
class SharedSends(Protocol):
    """A spool that several relays share counts their sends for upstream.rate_limit (PostgresSpool)."""

    async def take_sends(
        self, now: float, copies: Sequence[SpooledCopy], per_minute: int | None, per_day: int | None
    ) -> tuple[int, float]:
        """How many of these copies (in order) may be sent now, counted over every relay; the rest's wait."""


class AdminSpool(Protocol):
    """What the queue commands need: look at the queue, make copies due now, delete a message."""

    async def summaries(self) -> list[MessageSummary]: ...

    async def summary(self, message_id: str) -> MessageSummary | None: ...

    async def retry_now(self, now: float, message_id: str | None) -> int:
        """Make queued copies (of one message, or all) due now; returns how many."""

    async def delete(self, message_id: str) -> bool: ...

    async def close(self) -> None: ...


class ConsoleSpool(Protocol):
    """What the console and `privacy-relay held` need: the history, the held messages, the totals for /metrics."""

    async def history(self, limit: int, decision: str | None = None, text: str = "") -> list[MessageHistory]:
        """The newest messages first; text, if given, must be in the subject, the sender or a recipient."""

    async def history_of(self, message_id: str) -> MessageHistory | None: ...

    async def forget_history(self, before: float) -> int:
        """Drop what the history keeps of messages received before then and no longer waiting; how many."""

    async def metrics(self) -> SpoolMetrics: ...

    async def held_messages(self) -> list[HeldMessage]:
        """Messages still held, oldest first."""

    async def held_message(self, message_id: str) -> HeldMessage | None:
        """A held message in any state (once released, discarded or returned, its data is gone)."""

    async def settle_held(
        self, message_id: str, state: HeldState, replacement: NewMessage | None, record: MessageRecord | None
    ) -> bool:
        """Release (replacement: its copies), discard or return a held message, once: False if it was settled already.

        record, if given, is what the history shows from then on; a released message's copies take the place
        of its held entry there, while a report to the sender (returned) is not in the history.
        """

    async def check_writable(self) -> None:
        """Raise SpoolWriteError when a write cannot be committed (for /healthz)."""

    async def close(self) -> None: ...


class Spool(SchedulerSpool, AdminSpool, ConsoleSpool, Protocol):
    """A store that serves all three, as SqliteSpool and PostgresSpool do."""

    @property
    def label(self) -> str:
        """Where the spool is, for logs and the queue commands."""

    async def open(self) -> None:
        """Open (and create or migrate) the store; SpoolWriteError, sqlite3.Error or OSError when it cannot."""
