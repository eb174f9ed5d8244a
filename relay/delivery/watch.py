"""What a hybrid-mode client waits for: the first attempt of each copy of its message, or delivery.sync_timeout."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from relay.core.replies import Reply
from relay.core.retry import Verdict
from relay.spool.interface import Progress


@dataclass(slots=True)
class Watch:
    copies: int
    # The copies the client waits for: all of them, until a rate limit holds the rest back.
    expected: int = 0
    attempted: set[int] = field(default_factory=set)
    delivered: int = 0
    failed: dict[str, Reply] = field(default_factory=dict)
    deferred: int = 0
    settled: bool = False
    # Every copy delivered: the spool forgets the message, nothing is left to retire.
    forgotten: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, position: int, verdict: Verdict, progress: Progress) -> None:
        """A copy's attempt is over and stored; only its first attempt counts for the client."""
        if position not in self.attempted:
            self.attempted.add(position)
            self.delivered += len(verdict.delivered)
            self.failed.update(verdict.refused)
            self.deferred += int(bool(verdict.retry))
        # Once settled, a message stays settled: an earlier copy's result may be handled after a later one's.
        self.settled = self.settled or progress is not Progress.SENDING
        self.forgotten = self.forgotten or progress is Progress.DELIVERED
        if self.settled or len(self.attempted) >= self.expected:
            self.done.set()

    def hold_back(self, sending: int) -> None:
        """A rate limit holds copies back: the client hears about the `sending` ones in flight, not those."""
        self.expected = min(self.expected, len(self.attempted) + sending)
        if len(self.attempted) >= self.expected:
            self.done.set()
