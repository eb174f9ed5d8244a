"""The console's secret: made at first start, kept in a file only the relay's user may read."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TOKEN_BYTES = 32


def load_or_create_token(path: Path) -> str:
    """The token in path, or a new one written there (mode 0600); raises OSError when neither works."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = ""
    if token:
        return token
    token = secrets.token_urlsafe(TOKEN_BYTES)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # O_EXCL: two processes starting at once never both write; the loser reads the winner's token.
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text(encoding="ascii").strip()
        if not token:
            raise OSError(f"{path} is empty; delete it and the relay makes a new token") from None
        return token
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(token + "\n")
    return token
