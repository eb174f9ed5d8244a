"""What the client is told about a message once delivery has had its go: one reply line, built in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.core.replies import Reply


def _copies(count: int) -> str:
    return f"{count} cop{'y' if count == 1 else 'ies'}"


@dataclass(slots=True)
class DeliveryReport:
    destination: str
    copies: int
    delivered_recipients: int = 0
    failures: dict[str, Reply] = field(default_factory=dict)
    # Spooled modes: copies left in the spool for later, and failed recipients the sender hears of by a DSN.
    queued: int = 0
    bounced: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def client_reply(self, queue_id: str) -> str:
        if self.queued or self.bounced:
            parts = []
            if self.queued:
                parts.append(f"{self.queued} of {_copies(self.copies)} will be sent from the queue")
            if self.bounced:
                parts.append(f"{self.bounced} recipient(s) refused; a delivery report goes to the sender")
            return f"250 2.0.0 OK: queued as {queue_id} ({'; '.join(parts)})"
        if not self.failures:
            return f"250 2.0.0 OK: relayed as {_copies(self.copies)} (id {queue_id})"
        replies = list(self.failures.values())
        temporary = [r for r in replies if not r.is_permanent]
        chosen = temporary[0] if temporary else replies[0]
        # The upstream's 421 closed the upstream's session; passed on, it would tell the client that
        # the relay is closing this one (RFC 5321 3.8), so clients would drop it mid-session.
        code = 451 if chosen.code == 421 else chosen.code
        failed = ", ".join(self.failures)
        text = f"{chosen.text} (not delivered to: {failed}"
        if self.delivered_recipients:
            text += f"; {self.delivered_recipients} other recipient(s) already received it"
        return f"{code} {chosen.enhanced} {' '.join((text + ')').split())}"
