"""Errors that become SMTP replies: each carries its code, enhanced status code and human text."""

from __future__ import annotations


class SmtpReply(Exception):
    """A reply for the client; raised where a message is refused, rendered in one place."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def render(self) -> str:
        """One SMTP reply line; multi-line texts are joined so the reply stays one line."""
        text = " ".join(self.text.split())
        return f"{self.code} {self.enhanced} {text}"
