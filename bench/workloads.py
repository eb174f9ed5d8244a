"""The issue's workloads (W1 passthrough, W2 fan-out, W3 big message) and the messages they send.

Recipients are named the way smtp-source names them (-r N -t rcpt@dest.test sends to Nrcpt@..., ...,
2rcpt@..., rcpt@...), and the same addresses are written into To, so the relay sees a message that
exposes every recipient and splits it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAIL_FROM = "sender@bench.test"
BASE_RECIPIENT = "rcpt@dest.test"
KIB = 1024
MIB = 1024 * KIB
FILLER = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n"


def recipients(count: int) -> list[str]:
    return [f"{n}{BASE_RECIPIENT}" for n in range(count, 1, -1)] + [BASE_RECIPIENT]


def message(recipient_count: int, size: int, subject: str) -> bytes:
    """A plain-text message of about `size` bytes (LF line endings, as smtp-source -F reads it)."""
    headers = (
        f"From: Bench Sender <{MAIL_FROM}>\n"
        f"To: {', '.join(recipients(recipient_count))}\n"
        f"Subject: {subject}\n"
        "Date: Wed, 25 Nov 2026 04:00:00 +0000\n"
        "Message-ID: <bench@bench.test>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
    ).encode()
    lines = max(1, math.ceil((size - len(headers)) / len(FILLER)))
    return headers + FILLER * lines


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    messages: int
    recipients: int
    sessions: int
    size: int
    latency_only: bool = False

    @property
    def copies(self) -> int:
        """Upstream transactions the relay makes: one per recipient once a message is split."""
        return self.messages * self.recipients

    def postfix_transactions(self, recipient_limit: int) -> int:
        """Postfix does not split: it sends one transaction per message per `recipient_limit` recipients."""
        return self.messages * math.ceil(self.recipients / recipient_limit)

    def content(self) -> bytes:
        return message(self.recipients, self.size, f"{self.name} {self.title}")


FULL = (
    Workload("L0", "latency", messages=300, recipients=1, sessions=1, size=4 * KIB, latency_only=True),
    Workload("W1", "passthrough", messages=2000, recipients=1, sessions=10, size=4 * KIB),
    Workload("W2", "fan-out", messages=400, recipients=25, sessions=10, size=4 * KIB),
    Workload("W3", "big message", messages=1, recipients=200, sessions=1, size=20 * MIB),
)
SMOKE = (
    Workload("L0", "latency", messages=10, recipients=1, sessions=1, size=4 * KIB, latency_only=True),
    Workload("W1", "passthrough", messages=20, recipients=1, sessions=2, size=4 * KIB),
    Workload("W2", "fan-out", messages=4, recipients=5, sessions=2, size=4 * KIB),
    Workload("W3", "big message", messages=1, recipients=5, sessions=1, size=256 * KIB),
)
PROBE = Workload("probe", "latency probe", messages=1, recipients=1, sessions=1, size=4 * KIB)
