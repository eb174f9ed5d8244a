"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.spool.sqlite import SqliteSpool


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    """An open SQLite spool in tmp_path, closed after the test."""
    opened = SqliteSpool(tmp_path / "spool")
    await opened.open()
    yield opened
    await opened.close()
