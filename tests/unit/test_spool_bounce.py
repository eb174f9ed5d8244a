"""The delivery status notification: an RFC 3464 multipart/report a mail program can read."""

from __future__ import annotations

from email import message_from_bytes
from email.policy import default

from relay.core.dsn import FailedRecipient, build_dsn
from relay.core.replies import Reply


def test_a_dsn_names_each_failed_recipient_with_the_upstream_reply() -> None:
    dsn = build_dsn(
        sender="coach@coaching.test",
        queue_id="ABC123",
        reporting_host="relay.test",
        remote="upstream smtp.test:587",
        arrival_date="Wed, 25 Nov 2026 04:00:00 +0000",
        date="Wed, 25 Nov 2026 04:01:00 +0000",
        failures=[
            FailedRecipient("bad@two.test", Reply(550, "5.1.1", "No such user")),
            FailedRecipient("slow@three.test", Reply(451, "4.4.1", "cannot reach (gave up)"), expired=True),
        ],
        original_headers=b"From: Coach <coach@coaching.test>\r\nTo: bad@two.test\r\nSubject: Hi\r\n\r\n",
    )
    assert dsn.headers.endswith(b"\r\n\r\n") and b"\n" not in dsn.body.replace(b"\r\n", b"")
    parsed = message_from_bytes(dsn.headers + dsn.body, policy=default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["To"].addresses[0].addr_spec == "coach@coaching.test"
    assert parsed["Auto-Submitted"] == "auto-replied"
    human, status, headers = parsed.get_payload()
    assert "bad@two.test" in human.get_content() and "No such user" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert [(r["Final-Recipient"], r["Action"], r["Status"], r["Diagnostic-Code"]) for r in per_recipient] == [
        ("rfc822; bad@two.test", "failed", "5.1.1", "smtp; 550 5.1.1 No such user"),
        ("rfc822; slow@three.test", "failed", "4.4.7", "smtp; 451 4.4.1 cannot reach (gave up)"),
    ]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: Hi\r\n" in dsn.body
