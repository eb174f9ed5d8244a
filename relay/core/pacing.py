"""When the next attempt may start: retry backoff, provider rate limits and slowing down when throttled.

Pure: every function takes the time as an argument, so the rules can be tested without a clock.
"""

from __future__ import annotations

import random
import re
from collections import deque

MINUTE = 60.0
DAY = 86_400.0
# The slowest pace a throttled upstream is given: one transaction a minute.
MAX_PACE = 60.0
# Throttling replies name a rate or a limit: SES "454 Throttling failure: Maximum sending rate exceeded",
# Microsoft "4.3.2 ... limit exceeded", Gmail "4.7.28 ... unusual rate of unsolicited mail".
_THROTTLING = re.compile(r"throttl|\brate\b|limit exceeded|too many (?:messages|connections|recipients)", re.IGNORECASE)


def retry_delay(attempts: int, min_backoff: float, max_backoff: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: about min_backoff after the first failure, doubling, capped."""
    ceiling = min(max_backoff, min_backoff * 2 ** max(attempts - 1, 0))
    # Jitter spreads copies that failed together, so they don't all come back at the same moment.
    return rng.uniform(ceiling / 2, ceiling)


def is_throttling(code: int, enhanced: str, text: str) -> bool:
    """A temporary reply that says we send too fast, rather than that something is broken."""
    return 400 <= code < 500 and (enhanced == "4.3.2" or bool(_THROTTLING.search(text)))


class RateLimiter:
    """Sliding windows: per_minute counts transactions, per_day counts recipients."""

    def __init__(self, per_minute: int | None, per_day: int | None) -> None:
        self.per_minute = per_minute
        self.per_day = per_day
        self._minute: deque[float] = deque()
        self._day: deque[tuple[float, int]] = deque()
        self._day_total = 0

    def configure(self, per_minute: int | None, per_day: int | None) -> None:
        self.per_minute = per_minute
        self.per_day = per_day

    def _expire(self, now: float) -> None:
        while self._minute and self._minute[0] <= now - MINUTE:
            self._minute.popleft()
        while self._day and self._day[0][0] <= now - DAY:
            self._day_total -= self._day.popleft()[1]

    def record(self, now: float, recipients: int) -> None:
        self._minute.append(now)
        self._day.append((now, recipients))
        self._day_total += recipients

    def wait(self, now: float, recipients: int) -> float:
        """Seconds until a transaction with this many recipients may start (0: now)."""
        self._expire(now)
        waits = [0.0]
        if self.per_minute is not None and len(self._minute) >= self.per_minute:
            waits.append(self._minute[len(self._minute) - self.per_minute] + MINUTE - now)
        if self.per_day is not None and self._day_total + recipients > self.per_day:
            # Wait until enough of the last day's recipients have left the window.
            needed = self._day_total + min(recipients, self.per_day) - self.per_day
            freed = 0
            for sent_at, count in self._day:
                freed += count
                if freed >= needed:
                    waits.append(sent_at + DAY - now)
                    break
        return max(waits)

    def allowance(self, now: float) -> int | None:
        """How many one-recipient transactions may start now (None: no limit)."""
        self._expire(now)
        limits = []
        if self.per_minute is not None:
            limits.append(max(0, self.per_minute - len(self._minute)))
        if self.per_day is not None:
            limits.append(max(0, self.per_day - self._day_total))
        return min(limits) if limits else None

    def daily_capped(self, now: float, recipients: int) -> bool:
        self._expire(now)
        return self.per_day is not None and self._day_total + recipients > self.per_day


class Pacer:
    """Spacing between transactions to one upstream: doubles on each throttling reply, halves on success."""

    def __init__(self) -> None:
        self.interval = 0.0
        self._next_start = 0.0

    def wait(self, now: float) -> float:
        return max(0.0, self._next_start - now)

    def started(self, now: float) -> None:
        self._next_start = now + self.interval

    def throttled(self, now: float) -> None:
        self.interval = min(MAX_PACE, max(1.0, self.interval * 2))
        self._next_start = now + self.interval

    def succeeded(self) -> None:
        self.interval = 0.0 if self.interval < 1.0 else self.interval / 2
