"""What now, after an attempt: who has the copy, who failed for good, who is tried again, and when.

Pure: the time, the backoff settings, the pace and the jitter's random source all come in as arguments.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from relay.core.pacing import Pacer, is_throttling, retry_delay
from relay.core.replies import Reply

# What a recipient the destination named neither accepted nor refused counts as.
NO_REPLY = Reply(451, "4.4.0", "no reply for this recipient")


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """delivery.min_backoff, max_backoff and max_age, in seconds; the config layer builds it."""

    min_backoff: float
    max_backoff: float
    max_age: float


@dataclass(frozen=True, slots=True)
class Verdict:
    delivered: tuple[str, ...]
    # Refused for good by this attempt's replies (what a hybrid client still waiting hears).
    refused: Mapping[str, Reply]
    # Everyone failed for good: the refused, and those retried until max_age ran out.
    failed: tuple[tuple[str, Reply], ...]
    retry: tuple[str, ...]
    next_attempt: float  # 0 when nobody is left to retry
    last_reply: Reply | None
    throttled: bool


def judge_attempt(
    recipients: Sequence[str],
    accepted: Collection[str],
    replies: Mapping[str, Reply],
    *,
    attempts: int,
    received_at: float,
    now: float,
    settings: RetrySettings,
    pacer: Pacer,
    rng: random.Random,
) -> Verdict:
    """Sort one attempt's recipients and say when the rest go again; tells the pacer of throttling or success.

    attempts: the attempts made before this one. Temporary failures are retried with backoff (never sooner
    than the pace a throttling upstream set) until max_age after arrival; then they fail for good.
    """
    refused: dict[str, Reply] = {}
    retry: list[str] = []
    last: Reply | None = None
    for recipient in recipients:
        if recipient in accepted:
            continue
        reply = replies.get(recipient) or NO_REPLY
        last = reply
        if reply.is_permanent:
            refused[recipient] = reply
        else:
            retry.append(recipient)
    throttled = last is not None and not last.is_permanent and is_throttling(last.code, last.enhanced, last.text)
    if throttled:
        pacer.throttled(now)
    elif accepted:
        pacer.succeeded()
    deadline = received_at + settings.max_age
    failed = list(refused.items())
    if retry and now >= deadline:
        assert last is not None
        gave_up = Reply(
            last.code, last.enhanced, f"{last.text} (gave up after {settings.max_age / 86400:g} days of retries)"
        )
        failed += [(recipient, gave_up) for recipient in retry]
        retry = []
    next_attempt = 0.0
    if retry:
        delay = retry_delay(attempts + 1, settings.min_backoff, settings.max_backoff, rng)
        next_attempt = min(now + max(delay, pacer.interval), deadline)
    return Verdict(
        delivered=tuple(r for r in recipients if r in accepted),
        refused=refused,
        failed=tuple(failed),
        retry=tuple(retry),
        next_attempt=next_attempt,
        last_reply=last,
        throttled=throttled,
    )
