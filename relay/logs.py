"""structlog set-up: events with key-value context, addresses masked unless the config allows them."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from relay.config.models import LoggingConfig

# Event keys whose values are email addresses (a string or a list of them).
ADDRESS_KEYS = frozenset({"mail_from", "recipients", "recipient", "failed", "address", "leaked"})
# Account and login names: often an address (kay@coaching.example), then masked like one; a plain name
# (kay) stays readable, so an administrator can tell who sent what.
ACCOUNT_KEYS = frozenset({"user", "login"})


def mask_address(address: str) -> str:
    """j***@example.com: enough to tell messages apart, not enough to harvest addresses."""
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


def _mask_processor(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in ADDRESS_KEYS & event.keys():
        value = event[key]
        if isinstance(value, str):
            event[key] = mask_address(value)
        elif isinstance(value, list | tuple):
            event[key] = [mask_address(v) if isinstance(v, str) else v for v in value]
    for key in ACCOUNT_KEYS & event.keys():
        value = event[key]
        if isinstance(value, str) and "@" in value:
            event[key] = mask_address(value)
    return event


def configure_logging(config: LoggingConfig, stream: Any = None) -> None:
    stream = stream or sys.stderr
    use_json = config.format == "json" or (config.format == "auto" and not stream.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if not config.show_addresses:
        processors.append(_mask_processor)
    processors.append(structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[config.level.upper()]),
        # One write per event (print() writes the line and its newline separately), so the events of
        # listen.workers processes sharing stderr do not run into each other.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # aiosmtpd logs every envelope address at INFO level, and a deprecation WARNING at every
    # successful AUTH: keep its chatter out of our logs.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
