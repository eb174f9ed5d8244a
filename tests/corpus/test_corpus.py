"""Real messages nobody here wrote, through the real pipeline: each passes unchanged with its body intact,
is split with no leak, or is refused with a clear reason. None crashes.

The corpus is ../shared/corpus beside the repository (see its README), else CPython's own
Lib/test/test_email/data of the running interpreter.
"""

from __future__ import annotations

import email
import re
from pathlib import Path

import pytest

from relay.core.addresses import normalize_address, parse_address_list
from relay.core.message import parse_message
from relay.core.policy import Action
from relay.core.replies import RelayError
from tests.unit.mailkit import run

REPOSITORY = Path(__file__).resolve().parents[2]
CORPUS_CANDIDATES = [
    REPOSITORY.parent / "shared" / "corpus",
    Path(email.__file__).resolve().parent.parent / "test" / "test_email" / "data",
]
MESSAGE_SUFFIXES = {".eml", ".txt", ""}
FALLBACK_RECIPIENTS = ("first@corpus.test", "second@corpus.test")


def _corpus_files() -> tuple[Path | None, list[Path]]:
    for folder in CORPUS_CANDIDATES:
        if folder.is_dir():
            files = [
                p for p in folder.rglob("*") if p.is_file() and p.suffix in MESSAGE_SUFFIXES and p.name != "README.md"
            ]
            return folder, sorted(files)
    return None, []


CORPUS, FILES = _corpus_files()


def _envelope(data: bytes) -> tuple[str, list[str]]:
    """What `privacy-relay preview` assumes: From as sender, To/Cc/Bcc as recipients."""
    try:
        fields = parse_message(data).fields
    except RelayError:
        return "", list(FALLBACK_RECIPIENTS)
    senders = [m.address for f in fields if f.key == "from" for m in parse_address_list(f.value)]
    recipients = [m.address for f in fields if f.key in ("to", "cc", "bcc") for m in parse_address_list(f.value)]
    return (senders[0] if senders else ""), recipients or list(FALLBACK_RECIPIENTS)


@pytest.mark.skipif(CORPUS is None, reason=f"no corpus of real messages: looked in {CORPUS_CANDIDATES}")
@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CORPUS)) if CORPUS else "" for p in FILES])
@pytest.mark.parametrize("line_ending", ["as-stored", "crlf"])
def test_real_message(path: Path, line_ending: str) -> None:
    data = path.read_bytes()
    if line_ending == "crlf":
        data = re.sub(rb"\r?\n", b"\r\n", data)  # as an SMTP client sends it
    mail_from, recipients = _envelope(data)
    try:
        prepared = run(data, recipients, mail_from=mail_from, smtputf8=not data.isascii())
    except RelayError as refusal:
        assert 400 <= refusal.code < 600
        assert re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", refusal.enhanced)
        assert len(refusal.text) > 20  # a sentence a person can act on
        return
    body = prepared.copies[0].body
    assert data.endswith(body)
    for copy in prepared.copies:
        assert copy.body is body
    action = prepared.decision.action
    if action is Action.UNCHANGED:
        [copy] = prepared.copies
        kept = b"".join(f.raw for f in parse_message(data).fields if f.key not in ("bcc", "resent-bcc"))
        assert kept in copy.headers  # as written, behind the relay's Received line
        return
    assert action is Action.SPLIT
    protected = prepared.decision.protected
    for copy in prepared.copies:
        if copy.kind != "single":
            continue
        [own] = copy.recipients
        headers = copy.headers.decode("utf-8", errors="replace").lower()
        for other in protected - {normalize_address(own)}:
            assert not re.search(rf"(?<![\w.+-]){re.escape(other)}(?![\w.-])", headers), other
