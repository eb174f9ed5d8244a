"""The core's retry rule: after an attempt, who has the copy, who failed for good, who goes again and when."""

from __future__ import annotations

import random

import pytest

from relay.core.pacing import Pacer
from relay.core.replies import Reply
from relay.core.retry import NO_REPLY, RetrySettings, Verdict, judge_attempt

SETTINGS = RetrySettings(min_backoff=60, max_backoff=3600, max_age=5 * 86400)
LATER = Reply(451, "4.3.0", "Try again later")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user")
THROTTLED = Reply(454, "4.7.0", "Throttling failure: Maximum sending rate exceeded")


def judge(
    replies: dict[str, Reply],
    accepted: tuple[str, ...] = (),
    *,
    attempts: int = 0,
    now: float = 1000.0,
    pacer: Pacer | None = None,
    recipients: tuple[str, ...] = ("a@x.test", "b@x.test", "c@x.test"),
) -> Verdict:
    return judge_attempt(
        recipients,
        accepted,
        replies,
        attempts=attempts,
        received_at=1000.0,
        now=now,
        settings=SETTINGS,
        pacer=pacer or Pacer(),
        rng=random.Random(7),
    )


def test_each_recipient_is_delivered_failed_for_good_or_retried() -> None:
    verdict = judge({"b@x.test": NO_SUCH_USER, "c@x.test": LATER}, accepted=("a@x.test",))
    assert verdict.delivered == ("a@x.test",)
    assert verdict.refused == {"b@x.test": NO_SUCH_USER}
    assert verdict.failed == (("b@x.test", NO_SUCH_USER),)
    assert verdict.retry == ("c@x.test",)
    assert verdict.last_reply == LATER and not verdict.throttled


def test_a_recipient_without_a_reply_is_tried_again() -> None:
    verdict = judge({}, accepted=("a@x.test", "b@x.test"))
    assert verdict.retry == ("c@x.test",) and verdict.last_reply == NO_REPLY


def test_everyone_delivered_leaves_nothing_to_retry() -> None:
    verdict = judge({}, accepted=("a@x.test", "b@x.test", "c@x.test"))
    assert (verdict.failed, verdict.retry, verdict.next_attempt, verdict.last_reply) == ((), (), 0.0, None)


@pytest.mark.parametrize(("attempts", "low", "high"), [(0, 30, 60), (1, 60, 120), (3, 240, 480), (20, 1800, 3600)])
def test_retries_back_off_exponentially_with_jitter_up_to_max_backoff(attempts: int, low: float, high: float) -> None:
    verdict = judge({"a@x.test": LATER}, recipients=("a@x.test",), attempts=attempts)
    assert 1000.0 + low <= verdict.next_attempt <= 1000.0 + high


def test_no_retry_is_planned_past_max_age() -> None:
    now = 1000.0 + SETTINGS.max_age - 10
    verdict = judge({"a@x.test": LATER}, recipients=("a@x.test",), now=now)
    assert verdict.retry == ("a@x.test",) and verdict.next_attempt == 1000.0 + SETTINGS.max_age


def test_temporary_failures_fail_for_good_once_max_age_is_over() -> None:
    verdict = judge({"a@x.test": LATER}, recipients=("a@x.test",), now=1000.0 + SETTINGS.max_age)
    assert verdict.retry == () and verdict.refused == {}
    assert verdict.failed == (("a@x.test", Reply(451, "4.3.0", "Try again later (gave up after 5 days of retries)")),)


def test_throttling_slows_the_pacer_and_the_retry_waits_for_it() -> None:
    pacer = Pacer()
    pacer.interval = 2000.0  # already slowed down further than a first backoff
    verdict = judge({"a@x.test": THROTTLED}, recipients=("a@x.test",), pacer=pacer)
    assert verdict.throttled and pacer.interval == 60.0  # doubled, capped at one a minute
    assert verdict.next_attempt >= 1000.0 + 60.0


def test_a_delivery_speeds_the_pacer_up_again() -> None:
    pacer = Pacer()
    pacer.interval = 8.0
    judge({}, accepted=("a@x.test",), recipients=("a@x.test",), pacer=pacer)
    assert pacer.interval == 4.0
