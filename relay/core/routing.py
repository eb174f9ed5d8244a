"""Which upstream a message leaves through, by its envelope sender (Postfix's sender_dependent_relayhost_maps)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class SenderRoute(Protocol):
    """A route as the config's `routes` lists it: an address or *@domain, and the upstream's name."""

    @property
    def sender(self) -> str: ...

    @property
    def upstream(self) -> str: ...


def route_for(mail_from: str, routes: Sequence[SenderRoute]) -> str | None:
    """The name of the first route's upstream that matches the sender; None: the default `upstream`.

    A route's sender is an address or *@domain, compared without regard to case, as Postfix's lookups are.
    The null sender (<>, bounces) matches no route.
    """
    address = mail_from.casefold()
    domain = address.rpartition("@")[2]
    for route in routes:
        pattern = route.sender.casefold()
        if pattern.startswith("*@") and domain and domain == pattern[2:]:
            return route.upstream
        if address and address == pattern:
            return route.upstream
    return None
