"""Where accepted mail waits for the upstream: the Spool interface (interface.py), its SQLite implementation for
one machine, and PostgreSQL (postgres.py) shared by several relays; build_spool() picks by spool.url. Both keep the
history, held messages and totals the console reads (history.py, postgres_history.py)."""

from __future__ import annotations

from relay.config.models import Config, ConfigError
from relay.spool.interface import Spool
from relay.spool.sqlite import SqliteSpool


def build_spool(config: Config) -> Spool:
    """The PostgreSQL spool when spool.url is set, else the SQLite file in spool.path."""
    if config.spool.url is None:
        return SqliteSpool(config.spool.path)
    try:
        from relay.spool.postgres import PostgresSpool
    except ImportError as exc:
        raise ConfigError(
            f"spool.url is set, but the PostgreSQL driver is missing ({exc.name}): "
            "pip install 'privacy-relay[postgres]'"
        ) from None
    password = config.spool_password.get_secret_value() if config.spool_password else None
    return PostgresSpool(config.spool.url, password)
