"""Retry backoff, rate limits and throttling: the rules for when a spooled copy may go out."""

from __future__ import annotations

import random

import pytest

from relay.config.loading import ENV_KEYS, load_config
from relay.config.models import ConfigError
from relay.core.pacing import DAY, MAX_PACE, Pacer, RateLimiter, is_throttling, retry_delay


def test_backoff_doubles_from_the_first_retry_within_a_minute_up_to_the_cap() -> None:
    rng = random.Random(7)
    for attempts in range(1, 20):
        ceiling = min(3600, 60 * 2 ** (attempts - 1))
        delays = [retry_delay(attempts, 60, 3600, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jitter
    assert retry_delay(1, 60, 3600, rng) <= 60


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "throttling"),
    [
        (454, "4.0.0", "Throttling failure: Maximum sending rate exceeded.", True),
        (432, "4.3.2", "STOREDRV.ClientSubmit; sender thread limit exceeded", True),
        (421, "4.7.0", "Try again later, closing connection. (rate limit)", True),
        (451, "4.7.28", "Our system has detected an unusual rate of unsolicited mail", True),
        (451, "4.4.1", "cannot reach upstream (Connection refused); try again later", False),
        (450, "4.2.1", "Mailbox busy", False),
        (554, "5.7.0", "Throttling failure: Daily message quota exceeded.", False),
    ],
)
def test_throttling_replies_are_told_from_other_failures(code: int, enhanced: str, text: str, throttling: bool) -> None:
    assert is_throttling(code, enhanced, text) is throttling


def test_per_minute_counts_transactions_in_a_sliding_window() -> None:
    limiter = RateLimiter(per_minute=2, per_day=None)
    assert limiter.allowance(0) == 2
    limiter.record(0, 5)
    limiter.record(10, 1)
    assert limiter.allowance(20) == 0
    assert limiter.wait(20, 1) == 40  # the first one leaves the window at 60
    assert limiter.wait(60, 1) == 0
    assert limiter.allowance(70) == 2


def test_per_day_counts_recipients_and_says_how_long_until_room() -> None:
    limiter = RateLimiter(per_minute=None, per_day=10)
    limiter.record(0, 6)
    limiter.record(100, 3)
    assert limiter.wait(200, 1) == 0
    assert limiter.daily_capped(200, 2)
    assert limiter.wait(200, 2) == DAY - 200  # the six from t=0 must leave first
    assert limiter.wait(DAY + 1, 2) == 0


def test_a_throttled_upstream_gets_a_slower_pace_that_recovers_on_success() -> None:
    pacer = Pacer()
    assert pacer.wait(0) == 0
    pacer.throttled(0)
    assert pacer.interval == 1 and pacer.wait(0) == 1
    for _ in range(10):
        pacer.throttled(0)
    assert pacer.interval == MAX_PACE
    pacer.started(100)
    assert pacer.wait(100) == MAX_PACE
    while pacer.interval:
        pacer.succeeded()
    assert pacer.wait(100 + MAX_PACE) == 0


def test_nested_settings_have_environment_names() -> None:
    for name in (
        "RELAY_SPOOL_PATH",
        "RELAY_DELIVERY_MODE",
        "RELAY_DELIVERY_SYNC_TIMEOUT",
        "RELAY_DELIVERY_MAX_AGE",
        "RELAY_UPSTREAM_RATE_LIMIT_PER_MINUTE",
        "RELAY_UPSTREAM_RATE_LIMIT_PER_DAY",
        "RELAY_UPSTREAM_MAX_RECIPIENTS_PER_MESSAGE",
    ):
        assert name in ENV_KEYS
    config = load_config(
        None,
        {
            "RELAY_UPSTREAM_RATE_LIMIT_PER_MINUTE": "30",
            "RELAY_UPSTREAM_RATE_LIMIT_PER_DAY": "10000",
            "RELAY_DELIVERY_MAX_AGE": "2d",
            "RELAY_DELIVERY_SYNC_TIMEOUT": "90s",
        },
    )
    assert (config.upstream.rate_limit.per_minute, config.upstream.rate_limit.per_day) == (30, 10000)
    assert (config.delivery.max_age, config.delivery.sync_timeout) == (2 * DAY, 90)


def test_delivery_defaults() -> None:
    config = load_config(None, {})
    assert config.delivery.mode == "hybrid"
    assert (config.delivery.sync_timeout, config.delivery.max_age) == (20, 5 * DAY)
    assert config.upstream.rate_limit.per_minute is None and config.upstream.rate_limit.per_day is None
    assert config.upstream.max_recipients_per_message == 50
    assert str(config.spool.path) == "spool"


def test_a_duration_that_does_not_parse_names_its_variable() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(None, {"RELAY_DELIVERY_MAX_AGE": "5 weeks"})
    assert "delivery.max_age" in str(refused.value) and "RELAY_DELIVERY_MAX_AGE" in str(refused.value)
    assert "12h" in str(refused.value)
    with pytest.raises(ConfigError) as disagree:
        load_config(None, {"RELAY_DELIVERY_MIN_BACKOFF": "2h"})
    assert "RELAY_DELIVERY_MIN_BACKOFF" in str(disagree.value)
