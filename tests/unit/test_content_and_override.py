"""Leaks outside To/Cc (calendar invitations, winmail.dat) and the per-message override tag."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from relay.config.models import PolicyConfig
from relay.core.content import scan_content
from relay.core.message import parse_message
from relay.core.policy import Action
from relay.core.replies import RelayError
from tests.support.mailkit import SENDER, addresses_in, copy_for, message, run

ANN, BOB, CY = "ann@one.test", "bob@two.test", "cy@three.test"


def invitation(*attendees: str, encoding: str = "base64", to: str = f"{ANN}, {BOB}") -> bytes:
    lines = ["BEGIN:VCALENDAR", "METHOD:REQUEST", "BEGIN:VEVENT", f"ORGANIZER:mailto:{SENDER}"]
    # RFC 5545 folds long lines: the address may start on a continuation line.
    lines += [f"ATTENDEE;CN=Someone;ROLE=REQ-PARTICIPANT;RSVP=TRUE:\r\n mailto:{a}" for a in attendees]
    calendar = ("\r\n".join([*lines, "END:VEVENT", "END:VCALENDAR"]) + "\r\n").encode()
    payload = base64.encodebytes(calendar).replace(b"\n", b"\r\n") if encoding == "base64" else calendar
    return message(
        f"From: {SENDER}",
        f"To: {to}",
        "MIME-Version: 1.0",
        'Content-Type: multipart/alternative; boundary="outer"',
        body=b"--outer\r\nContent-Type: text/plain\r\n\r\nMeeting on Monday.\r\n"
        b'--outer\r\nContent-Type: text/calendar; method=REQUEST; charset="utf-8"\r\n'
        + f"Content-Transfer-Encoding: {encoding}\r\n\r\n".encode()
        + payload
        + b"--outer--\r\n",
    )


def tnef_message(to: str = f"{ANN}, {BOB}", content_type: str = "application/ms-tnef") -> bytes:
    return message(
        f"From: {SENDER}",
        f"To: {to}",
        'Content-Type: multipart/mixed; boundary="b1"',
        body=b"--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        + f'--b1\r\nContent-Type: {content_type}; name="winmail.dat"\r\n'.encode()
        + b"Content-Transfer-Encoding: base64\r\n\r\neJ8+IgAA\r\n--b1--\r\n",
    )


@pytest.mark.parametrize("encoding", ["base64", "7bit"])
def test_attendees_are_read_from_the_calendar_part(encoding: str) -> None:
    findings = scan_content(parse_message(invitation(ANN, "BOB@two.test", encoding=encoding)))
    assert findings.calendar_attendees == {ANN, BOB}
    assert not findings.has_tnef


def test_an_invitation_listing_other_recipients_is_refused_with_advice() -> None:
    with pytest.raises(RelayError) as refused:
        run(invitation(ANN, BOB), [ANN, BOB])
    assert (refused.value.code, refused.value.enhanced) == (550, "5.7.1")
    assert "meeting invitation" in refused.value.text and "one invitation per attendee" in refused.value.text


def test_an_invitation_exposes_even_when_the_recipients_are_in_bcc() -> None:
    data = invitation(ANN, BOB, to=SENDER)
    with pytest.raises(RelayError):
        run(data, [ANN, BOB])


def test_calendar_pass_splits_the_headers_and_keeps_the_calendar() -> None:
    data = invitation(ANN, BOB)
    prepared = run(data, [ANN, BOB], calendar="pass")
    assert prepared.decision.action is Action.SPLIT
    assert addresses_in(copy_for(prepared, ANN), "To") == [ANN]
    assert copy_for(prepared, ANN).body == data.split(b"\r\n\r\n", 1)[1]


def test_an_invitation_naming_only_people_outside_the_recipients_is_not_a_leak() -> None:
    prepared = run(invitation("room@rooms.test", to=SENDER), [ANN, BOB])
    assert prepared.decision.action is Action.UNCHANGED


def test_winmail_dat_is_refused_with_outlook_advice() -> None:
    with pytest.raises(RelayError) as refused:
        run(tnef_message(), [ANN, BOB])
    assert refused.value.code == 550
    assert "winmail.dat" in refused.value.text and "HTML" in refused.value.text


@pytest.mark.parametrize("content_type", ["application/vnd.ms-tnef", "application/octet-stream"])
def test_winmail_dat_is_recognised_by_type_or_name(content_type: str) -> None:
    assert scan_content(parse_message(tnef_message(content_type=content_type))).has_tnef


def test_winmail_dat_to_one_protected_recipient_is_fine() -> None:
    prepared = run(tnef_message(to=ANN), [ANN])
    assert prepared.decision.action is Action.UNCHANGED


def test_tnef_pass_splits() -> None:
    prepared = run(tnef_message(), [ANN, BOB], tnef="pass")
    assert prepared.decision.action is Action.SPLIT


def test_broken_mime_is_read_without_error() -> None:
    data = message(
        f"From: {SENDER}",
        f"To: {ANN}, {BOB}",
        'Content-Type: multipart/mixed; boundary="never-closed"',
        body=b"--never-closed\r\n\r\nno headers\r\n--never-closed\r\nContent-Type: text/calendar\r\n",
    )
    assert run(data, [ANN, BOB]).decision.action is Action.SPLIT


def test_override_tag_sends_as_written_without_the_tag() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}, {BOB}", f"Bcc: {CY}", "Subject: [Visible] Ann, meet Bob")
    prepared = run(data, [ANN, BOB, CY], override_tag="[visible]")
    assert prepared.decision.action is Action.OVERRIDE
    [copy] = prepared.copies
    assert copy.recipients == (ANN, BOB, CY)
    assert b"Subject: Ann, meet Bob\r\n" in copy.headers
    assert addresses_in(copy, "To") == [ANN, BOB]
    assert b"Bcc" not in copy.headers


def test_override_tag_also_overrides_a_calendar_refusal() -> None:
    data = invitation(ANN, BOB).replace(b"To:", b"Subject: Intro [visible]\r\nTo:", 1)
    prepared = run(data, [ANN, BOB], override_tag="[visible]")
    assert prepared.decision.action is Action.OVERRIDE
    assert b"Subject: Intro\r\n" in prepared.copies[0].headers


def test_without_the_tag_in_the_subject_the_policy_applies() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}, {BOB}", "Subject: visible")
    assert run(data, [ANN, BOB], override_tag="[visible]").decision.action is Action.SPLIT


def test_override_is_off_by_default_and_a_blank_tag_is_refused() -> None:
    assert PolicyConfig().override_tag is None
    with pytest.raises(ValidationError, match="override_tag"):
        PolicyConfig(override_tag="  ")


@pytest.mark.parametrize(
    "part_headers",
    [
        b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename*=utf-8''WINMAIL.DAT",
        b'Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="winmail.dat"',
    ],
)
def test_winmail_dat_is_recognised_by_its_file_name(part_headers: bytes) -> None:
    data = message(
        f"From: {SENDER}",
        f"To: {ANN}",
        'Content-Type: multipart/mixed; boundary="b"',
        body=b"--b\r\n" + part_headers + b"\r\n\r\nxx\r\n--b--\r\n",
    )
    assert scan_content(parse_message(data)).has_tnef


def test_an_ics_attachment_is_read_as_a_calendar() -> None:
    data = message(
        f"From: {SENDER}",
        f"To: {ANN}",
        'Content-Type: multipart/mixed; boundary="b"',
        body=b"--b\r\nContent-Type: application/octet-stream; name=invite.ics\r\n\r\n"
        b"BEGIN:VCALENDAR\r\nATTENDEE:mailto:bob@two.test\r\nEND:VCALENDAR\r\n--b--\r\n",
    )
    assert scan_content(parse_message(data)).calendar_attendees == {BOB}
