"""route_for: first match wins, exact address or *@domain, case-insensitive, null sender to the default."""

from __future__ import annotations

import pytest

from relay.config.models import RouteConfig
from relay.core.routing import route_for

ROUTES = (
    RouteConfig(sender="kay@coaching.test", upstream="personal"),
    RouteConfig(sender="*@coaching.test", upstream="office"),
    RouteConfig(sender="KAY@coaching.test", upstream="never"),
)


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("kay@coaching.test", "personal"),
        ("Kay@Coaching.TEST", "personal"),
        ("lee@coaching.test", "office"),
        ("lee@sub.coaching.test", None),  # a domain route is that domain only, as the issue's *@domain says
        ("lee@coaching.test.evil", None),
        ("", None),  # bounces (<>) leave through the default upstream
    ],
)
def test_route_for(sender: str, expected: str | None) -> None:
    assert route_for(sender, ROUTES) == expected


def test_no_routes_means_the_default() -> None:
    assert route_for("kay@coaching.test", ()) is None
