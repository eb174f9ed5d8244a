"""The console: a local web page to see what the relay does, its JSON API, /healthz and Prometheus /metrics.

It runs in the relay's process (the supervisor's, with listen.workers > 1) on an event loop of its own in a
thread, so a slow page never holds up mail, and reads everything it shows from the spool, which every
worker writes to.
"""

from relay.console.service import ConsoleThread
from relay.console.state import UpstreamCheck

__all__ = ["ConsoleThread", "UpstreamCheck"]
