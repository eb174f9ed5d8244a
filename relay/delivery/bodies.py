"""The one in-memory body cache of delivery: a message's body while copies of it are being sent."""

from __future__ import annotations

from collections.abc import Iterable


class BodyCache:
    """One body object per message, shared by all its copies, kept while anyone uses it.

    The sends in flight and a hybrid client waiting for its first attempts each hold it; the last to let go
    drops it. A copy claimed from the spool while its message's body is held is not read again.
    """

    def __init__(self) -> None:
        self._bodies: dict[str, tuple[bytes, int]] = {}  # message id -> (body, users)

    def hold(self, message_id: str, body: bytes) -> None:
        held, users = self._bodies.get(message_id, (body, 0))
        self._bodies[message_id] = (held, users + 1)

    def release(self, message_id: str) -> bool:
        """Let go of a body; True when that was its last user and it is gone."""
        held, users = self._bodies[message_id]
        if users <= 1:
            del self._bodies[message_id]
            return True
        self._bodies[message_id] = (held, users - 1)
        return False

    def get(self, message_id: str) -> bytes | None:
        held = self._bodies.get(message_id)
        return None if held is None else held[0]

    def missing(self, message_ids: Iterable[str]) -> set[str]:
        return set(message_ids) - self._bodies.keys()
