"""One reply model: a Reply value (code, enhanced status, text) and RelayError, the root of errors that carry one.

The client's reply, the upstream's, a DSN's status and the spool's columns are all this one value; nothing
turns a reply into text to parse it back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")
# The enhanced status a reply without one stands for (RFC 3463's generic classes).
_CLASS_STATUS = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """A reply as a server sent it: its text on one line, the enhanced status split off (or its class's)."""
        text = " ".join(message.split())
        match = _ENHANCED.match(text)
        if match:
            return cls(code, match.group(1), text[match.end() :])
        return cls(code, _CLASS_STATUS.get(code // 100, "4.0.0"), text)

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def render(self) -> str:
        """One SMTP reply line; multi-line texts are joined so the reply stays one line."""
        text = " ".join(self.text.split())
        return f"{self.code} {self.enhanced} {text}"


class RelayError(Exception):
    """The root of the relay's errors: each carries the Reply it means for the client; rendered in one place."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        self.reply = Reply(code, enhanced, text)
        super().__init__(self.reply.render())

    @property
    def code(self) -> int:
        return self.reply.code

    @property
    def enhanced(self) -> str:
        return self.reply.enhanced

    @property
    def text(self) -> str:
        return self.reply.text

    @property
    def is_permanent(self) -> bool:
        return self.reply.is_permanent

    def render(self) -> str:
        return self.reply.render()
