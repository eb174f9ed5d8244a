"""Which upstream a message leaves through, by its envelope sender (Postfix's sender_dependent_relayhost_maps)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.config.models import Config, RouteConfig, UpstreamConfig


def route_for(mail_from: str, routes: Sequence[RouteConfig]) -> str | None:
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


@dataclass(frozen=True, slots=True)
class UpstreamChoice:
    """An upstream picked by route: its name in `upstreams` (None: the default `upstream`) and its settings."""

    name: str | None
    config: UpstreamConfig

    @property
    def key(self) -> str:
        """Where it is set in the config, as error texts name it."""
        return "upstream" if self.name is None else f"upstreams.{self.name}"


def upstream_for(address: str, config: Config) -> UpstreamChoice:
    """The upstream that mail from this address leaves through."""
    name = route_for(address, config.routes)
    return UpstreamChoice(name, config.upstream if name is None else config.upstreams[name])
