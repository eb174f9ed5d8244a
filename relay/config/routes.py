"""The upstream a sender's mail leaves through, with its settings, as the routes in the config pick it."""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.models import Config, UpstreamConfig
from relay.core.routing import route_for


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
