"""Fixtures of the unit tests: open spools, closed after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.postgres import PASSWORD
from relay.spool.interface import Spool
from relay.spool.sqlite import SqliteSpool


@pytest.fixture
async def sqlite_spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    """An open SQLite spool in tmp_path."""
    opened = SqliteSpool(tmp_path / "spool")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def spool(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Spool]:
    """An open spool of each kind: SQLite in tmp_path, PostgreSQL in a new database of the private cluster."""
    if request.param == "sqlite":
        opened: Spool = SqliteSpool(tmp_path / "spool")
    else:
        from relay.spool.postgres import PostgresSpool

        opened = PostgresSpool(request.getfixturevalue("postgres_database"), PASSWORD)
    await opened.open()
    yield opened
    await opened.close()
