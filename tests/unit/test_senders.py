"""The passthrough sender checks as pure functions: routes and the session's login in, a refusal or None out."""

from __future__ import annotations

from relay.config.models import RouteConfig
from relay.core.message import parse_message
from relay.core.senders import (
    UpstreamLogin,
    needs_own_login_refusal,
    upstream_login_from_refusal,
    upstream_login_refusal,
)
from tests.support.mailkit import message

ROUTES = (RouteConfig(sender="*@coaching.test", upstream="coaching"),)
KAY_AT_COACHING = UpstreamLogin("coaching", "upstreams.coaching", "kay@coaching.test")


def test_a_login_sends_only_what_leaves_through_its_own_upstream() -> None:
    assert upstream_login_refusal(ROUTES, KAY_AT_COACHING, "lee@coaching.test", "MAIL FROM") is None
    refusal = upstream_login_refusal(ROUTES, KAY_AT_COACHING, "kay@private.test", "MAIL FROM")
    assert refusal is not None and (refusal.code, refusal.enhanced) == (553, "5.7.1")
    assert "upstreams.coaching, where kay@coaching.test logged in" in refusal.text


def test_every_from_address_is_checked() -> None:
    mixed = parse_message(message("From: kay@coaching.test, kay@private.test", "To: ann@one.test"))
    refusal = upstream_login_from_refusal(ROUTES, KAY_AT_COACHING, mixed)
    assert refusal is not None and "<kay@private.test>" in refusal.text and "(From header)" in refusal.text
    own = parse_message(message("From: kay@coaching.test", "To: ann@one.test"))
    assert upstream_login_from_refusal(ROUTES, KAY_AT_COACHING, own) is None


def test_mail_through_a_passthrough_upstream_needs_that_login() -> None:
    assert needs_own_login_refusal(None, "kay@private.test", authenticated=False) is None
    assert needs_own_login_refusal("upstreams.coaching", "kay@coaching.test", authenticated=False).code == 530  # type: ignore[union-attr]
    logged_in_elsewhere = needs_own_login_refusal("upstreams.coaching", "kay@coaching.test", authenticated=True)
    assert logged_in_elsewhere is not None and logged_in_elsewhere.code == 553
