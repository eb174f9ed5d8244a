"""Real messages nobody here wrote, through the real pipeline: each passes unchanged with its body intact,
is split with no leak, or is refused with a clear reason. None crashes.

The corpus is ../shared/corpus beside the repository (see its README), else CPython's own
Lib/test/test_email/data of the running interpreter.
"""

from __future__ import annotations

import email
import re
from email.policy import compat32
from pathlib import Path

import pytest

from relay.core.addresses import normalize_address, parse_address_list
from relay.core.line_length import MAX_LINE_OCTETS, longest_line
from relay.core.message import parse_message
from relay.core.policy import Action
from relay.core.replies import RelayError
from tests.support.mailkit import run

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


def _alternate(data: bytes) -> bytes:
    """LF and CRLF line endings, alternating line by line."""
    endings = iter([b"\n", b"\r\n"] * (data.count(b"\n") // 2 + 1))
    return re.sub(rb"\r?\n", lambda _: next(endings), data)


# Every line ending a sender's program produces, applied to the whole stored message.
LINE_ENDINGS = {
    "as-stored": lambda data: data,
    "crlf": lambda data: re.sub(rb"\r?\n", b"\r\n", data),  # as an SMTP client sends it
    "lf": lambda data: re.sub(rb"\r?\n", b"\n", data),
    "cr-cr-lf": lambda data: re.sub(rb"\r?\n", b"\r\r\n", data),  # a script that adds its own CR
    "lone-cr": lambda data: re.sub(rb"\r?\n", b"\r", data),
    "mixed": _alternate,
}


def _decoded_parts(data: bytes) -> list[bytes]:
    leaves = email.message_from_bytes(data, policy=compat32).walk()
    return [part.get_payload(decode=True) for part in leaves if not part.is_multipart()]


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
@pytest.mark.parametrize("line_ending", LINE_ENDINGS)
def test_real_message(path: Path, line_ending: str) -> None:
    data = LINE_ENDINGS[line_ending](path.read_bytes())
    mail_from, recipients = _envelope(data)
    try:
        prepared = run(data, recipients, mail_from=mail_from, smtputf8=not data.isascii())
    except RelayError as refusal:
        assert 400 <= refusal.code < 600
        assert re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", refusal.enhanced)
        assert len(refusal.text) > 20  # a sentence a person can act on
        return
    body = prepared.copies[0].body
    # The body as sent: its bytes, each line ending (LF, CR CR LF or a CR alone) as CRLF.
    as_crlf = re.sub(rb"\r*\n|\r", b"\r\n", data)
    re_encoded = longest_line(as_crlf) > MAX_LINE_OCTETS
    if re_encoded:
        # Re-encoded so that no line is over 998 octets: the decoded content of every part is the same.
        assert _decoded_parts(prepared.copies[0].headers + body) == _decoded_parts(as_crlf)
    else:
        assert as_crlf.endswith(body)
    for copy in prepared.copies:
        assert copy.body is body
        assert longest_line(copy.headers + copy.body) <= MAX_LINE_OCTETS
    action = prepared.decision.action
    if action is Action.UNCHANGED:
        [copy] = prepared.copies
        # Bcc is dropped; a re-encoded message gets its own Content-Transfer-Encoding at the end.
        dropped = {"bcc", "resent-bcc"} | ({"content-transfer-encoding"} if re_encoded else set())
        kept = b"".join(f.raw for f in parse_message(data).fields if f.key not in dropped)
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


def _outcome(data: bytes) -> object:
    mail_from, recipients = _envelope(data)
    try:
        prepared = run(data, recipients, mail_from=mail_from, smtputf8=not data.isascii())
    except RelayError as refusal:
        return refusal.render()
    return [(copy.recipients, copy.headers, copy.body) for copy in prepared.copies]


@pytest.mark.skipif(CORPUS is None, reason=f"no corpus of real messages: looked in {CORPUS_CANDIDATES}")
@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CORPUS)) if CORPUS else "" for p in FILES])
def test_lf_cr_cr_lf_and_mixed_line_endings_are_read_as_the_same_message_as_crlf(path: Path) -> None:
    stored = path.read_bytes()
    as_crlf = _outcome(LINE_ENDINGS["crlf"](stored))
    for variant in ("lf", "cr-cr-lf", "mixed"):
        assert _outcome(LINE_ENDINGS[variant](stored)) == as_crlf, variant
