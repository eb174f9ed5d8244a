"""Long lines as a property: any mix of long header and body lines, in plain and multipart messages, leaves
the relay with no line over 998 octets and every part's decoded content unchanged, or is refused with 554."""

from __future__ import annotations

from email import message_from_bytes
from email.policy import compat32

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.line_length import MAX_LINE_OCTETS, longest_line
from relay.core.message import parse_message
from relay.core.replies import RelayError
from tests.support.mailkit import SENDER, run

RECIPIENTS = ["ann@one.test", "bob@two.test"]
text_lines = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=40),
        st.integers(900, 3000).map(lambda n: ("ab= \t" * n)[:n]),  # long, with '=' and whitespace
        st.integers(900, 3000).map(lambda n: "x" * n),
    ),
    min_size=1,
    max_size=6,
)


def _text(lines: list[str]) -> bytes:
    return "\r\n".join(lines).encode() + b"\r\n"


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    subject = draw(text_lines)[0]
    headers = f"From: {SENDER}\r\nTo: {', '.join(RECIPIENTS)}\r\nSubject: {subject}\r\n".encode()
    if draw(st.booleans()):
        return headers + b"\r\n" + _text(draw(text_lines))
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        encoding = draw(st.sampled_from(["", "7bit", "8bit", "base64"]))
        # base64 on one line (maybe a long one), or lines of text
        base64_line = b"QUJD" * draw(st.integers(1, 1000)) + b"\r\n"
        content = base64_line if encoding == "base64" else _text(draw(text_lines))
        cte = f"Content-Transfer-Encoding: {encoding}\r\n".encode() if encoding else b""
        parts.append(b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n" + cte + b"\r\n" + content)
    subtype = draw(st.sampled_from(["mixed", "alternative", "signed"]))
    return (
        headers
        + f'MIME-Version: 1.0\r\nContent-Type: multipart/{subtype}; boundary="b"\r\n\r\n'.encode()
        + b"\r\n".join(parts)
        + b"\r\n--b--\r\n"
    )


def _decoded_parts(data: bytes) -> list[bytes | None]:
    leaves = message_from_bytes(data, policy=compat32).walk()
    return [part.get_payload(decode=True) for part in leaves if not part.is_multipart()]


@settings(max_examples=150, deadline=None)
@given(messages())
def test_no_line_over_998_octets_leaves_and_the_content_is_kept(data: bytes) -> None:
    try:
        prepared = run(data, RECIPIENTS)
    except RelayError as refusal:
        assert (refusal.code, refusal.enhanced) == (554, "5.6.0"), refusal.render()
        return
    for copy in prepared.copies:
        sent = copy.headers + copy.body
        assert longest_line(sent) <= MAX_LINE_OCTETS
        assert _decoded_parts(sent) == _decoded_parts(data)
        assert parse_message(sent).first_value("subject") == parse_message(data).first_value("subject")
