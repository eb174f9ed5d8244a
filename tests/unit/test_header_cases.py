"""The header cases of the privacy promise, each through the real pipeline (parse, policy, rewrite, leak check)."""

from __future__ import annotations

import pytest

from relay.core.pipeline import PrivacyCheckFailed
from relay.core.policy import Action
from relay.core.replies import RelayError
from tests.support.mailkit import BODY, SENDER, addresses_in, copy_for, message, parsed, run

ANN, BOB, CY = "ann@one.test", "bob@two.test", "cy@three.test"


def assert_private(prepared, recipients) -> None:
    """Every protected recipient has its own copy whose headers name no other recipient."""
    for recipient in recipients:
        copy = copy_for(prepared, recipient)
        assert copy.recipients == (recipient,)
        assert addresses_in(copy, "To") == [recipient.lower()]
        assert parsed(copy)["Cc"] is None
        headers = copy.headers.lower()
        for other in recipients:
            if other.lower() != recipient.lower():
                assert other.lower().encode() not in headers
        assert copy.body == BODY


def test_group_syntax_is_split_and_the_group_name_dropped() -> None:
    data = message(f"From: {SENDER}", f"To: Friends: Ann <{ANN}>, {BOB};, {CY}", "Subject: x")
    prepared = run(data, [ANN, BOB, CY])
    assert prepared.decision.action is Action.SPLIT
    assert_private(prepared, [ANN, BOB, CY])
    assert b"Friends" not in copy_for(prepared, ANN).headers
    assert parsed(copy_for(prepared, ANN))["To"].addresses[0].display_name == "Ann"


def test_undisclosed_recipients_group_with_bcc_goes_unchanged_without_bcc() -> None:
    data = message(f"From: {SENDER}", "To: undisclosed-recipients:;", f"Bcc: {ANN}, {BOB}")
    prepared = run(data, [ANN, BOB])
    assert prepared.decision.action is Action.UNCHANGED
    [copy] = prepared.copies
    assert b"bcc" not in copy.headers.lower()
    assert ANN.encode() not in copy.headers and BOB.encode() not in copy.headers


def test_several_to_and_cc_fields_become_one_to() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}", f"Cc: {BOB}", f"To: {CY}", "Cc: dee@four.test", "Cc: eve@five.test")
    everyone = [ANN, BOB, CY, "dee@four.test", "eve@five.test"]
    prepared = run(data, everyone)
    assert_private(prepared, everyone)
    for copy in prepared.copies:
        assert len(parsed(copy).get_all("To")) == 1


def test_folded_very_long_to_field() -> None:
    recipients = [f"person{i}@domain{i}.test" for i in range(300)]
    folded = ",\r\n\t".join(f'"Person {i}" <{r}>' for i, r in enumerate(recipients))
    prepared = run(message(f"From: {SENDER}", f"To: {folded}"), recipients)
    assert len(prepared.copies) == 300
    assert_private(prepared, recipients[:3] + recipients[-3:])


def test_stray_semicolon_and_missing_comma_do_not_hide_addresses() -> None:
    # The standard library's parser returns only ann for both of these fields.
    data = message(f"From: {SENDER}", f"To: {ANN}; {BOB}", f"Cc: <{CY}> <dee@four.test>")
    prepared = run(data, [ANN])
    assert prepared.decision.action is Action.SPLIT
    assert prepared.decision.protected == {ANN, BOB, CY, "dee@four.test"}
    assert_private(prepared, [ANN])


def test_display_name_that_is_another_recipients_address_is_dropped() -> None:
    data = message(f"From: {SENDER}", f'To: "{BOB}" <{ANN}>, Cy <{CY}>', f"Cc: {BOB} <{BOB}>")
    prepared = run(data, [ANN, BOB, CY])
    assert_private(prepared, [ANN, BOB, CY])
    assert parsed(copy_for(prepared, ANN))["To"].addresses[0].display_name == ""


def test_display_name_with_comma_keeps_its_quotes() -> None:
    data = message(f"From: {SENDER}", f'To: "Smith, Ann" <{ANN}>, "Jones, Bob" <{BOB}>')
    prepared = run(data, [ANN, BOB])
    assert_private(prepared, [ANN, BOB])
    assert parsed(copy_for(prepared, ANN))["To"].addresses[0].display_name == "Smith, Ann"


def test_encoded_word_display_names_stay_encoded_and_correct() -> None:
    data = message(f"From: {SENDER}", f"To: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <{ANN}>, =?iso-8859-1?q?Z=F6e?= <{BOB}>")
    prepared = run(data, [ANN, BOB])
    assert_private(prepared, [ANN, BOB])
    assert copy_for(prepared, ANN).headers.isascii()
    assert parsed(copy_for(prepared, ANN))["To"].addresses[0].display_name == "Jörg Müller"
    assert parsed(copy_for(prepared, BOB))["To"].addresses[0].display_name == "Zöe"


def test_comments_around_and_inside_addresses() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN} (Ann at work), bob (nested (comment)) @ two.test, (x) <{CY}>")
    prepared = run(data, [ANN, BOB, CY])
    assert prepared.decision.protected == {ANN, BOB, CY}
    assert_private(prepared, [ANN, BOB, CY])


@pytest.mark.parametrize(
    ("written", "envelope"),
    [('"ann smith"@one.test', '"ann smith"@one.test'), ('"a\\"b"@one.test', '"a\\"b"@one.test')],
)
def test_quoted_and_escaped_local_parts(written: str, envelope: str) -> None:
    data = message(f"From: {SENDER}", f"To: {written}, {BOB}")
    prepared = run(data, [envelope, BOB])
    assert prepared.decision.action is Action.SPLIT
    bob_copy = copy_for(prepared, BOB)
    assert b"one.test" not in bob_copy.headers
    assert b"one.test" in copy_for(prepared, envelope).headers


def test_obsolete_route_syntax() -> None:
    data = message(f"From: {SENDER}", f"To: Ann <@relay.test,@hub.test:{ANN}>, {BOB}")
    prepared = run(data, [ANN, BOB])
    assert_private(prepared, [ANN, BOB])
    assert b"relay.test:" not in copy_for(prepared, ANN).headers


def test_the_same_person_twice_in_different_case_gets_one_copy_with_the_display_name() -> None:
    data = message(f"From: {SENDER}", f"To: ANN@ONE.TEST, Ann <{ANN}>", f"Cc: {BOB}")
    prepared = run(data, ["Ann@One.Test", ANN, BOB])
    assert len(prepared.copies) == 2
    ann_copy = copy_for(prepared, "Ann@One.Test")
    assert parsed(ann_copy)["To"].addresses[0].display_name == "Ann"
    assert BOB.encode() not in ann_copy.headers


def test_sender_among_the_recipients_gets_the_message_as_written() -> None:
    data = message(f"From: Coach <{SENDER}>", f"To: {SENDER}, {ANN}, {BOB}")
    prepared = run(data, [SENDER, ANN, BOB])
    own = copy_for(prepared, SENDER)
    assert own.kind == "original"
    assert ANN.encode() in own.headers and BOB.encode() in own.headers
    assert_private(prepared, [ANN, BOB])


def test_utf8_addresses_with_smtputf8() -> None:
    jorg = "jörg@bücher.test"
    data = message(f"From: {SENDER}", f"To: Jörg <{jorg}>, {ANN}")
    prepared = run(data, [jorg, ANN], smtputf8=True)
    assert_private(prepared, [ANN])
    assert "jörg".encode() in copy_for(prepared, jorg).headers
    assert b"xn--" not in copy_for(prepared, ANN).headers


def test_punycode_and_unicode_spellings_of_one_domain_are_one_recipient() -> None:
    data = message(f"From: {SENDER}", f"To: ann@xn--bcher-kva.test, {BOB}")
    prepared = run(data, ["ann@bücher.test", BOB], smtputf8=True)
    assert prepared.decision.protected == {"ann@bücher.test", BOB}
    bob_copy = copy_for(prepared, BOB)
    assert b"bcher" not in bob_copy.headers


def test_resent_fields_show_only_the_copy_recipient() -> None:
    data = message(
        f"From: {SENDER}",
        f"To: {ANN}",
        "Resent-Date: Wed, 25 Nov 2026 05:00:00 +0000",
        f"Resent-From: {SENDER}",
        f"Resent-To: {BOB}, {CY}",
        "Resent-Cc: dee@four.test",
        "Resent-Bcc: eve@five.test",
    )
    everyone = [ANN, BOB, CY, "dee@four.test", "eve@five.test"]
    prepared = run(data, everyone)
    for recipient in everyone:
        copy = copy_for(prepared, recipient)
        assert addresses_in(copy, "Resent-To") == [recipient]
        assert parsed(copy)["Resent-Cc"] is None and parsed(copy)["Resent-Bcc"] is None
    assert_private(prepared, everyone)


def test_each_resent_block_keeps_one_resent_to() -> None:
    block = ["Resent-Date: Wed, 25 Nov 2026 05:00:00 +0000", f"Resent-From: {SENDER}", f"Resent-To: {ANN}, {BOB}"]
    prepared = run(message(f"From: {SENDER}", *block, *block, f"To: {ANN}"), [ANN, BOB])
    copy = copy_for(prepared, BOB)
    assert addresses_in(copy, "Resent-To") == [BOB, BOB]
    assert_private(prepared, [ANN, BOB])


@pytest.mark.parametrize("field", ["Reply-To", "Mail-Followup-To"])
def test_reply_all_fields_lose_protected_recipients_and_keep_the_rest(field: str) -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}, {BOB}", f"{field}: {SENDER}, {ANN}, {BOB}")
    prepared = run(data, [ANN, BOB])
    assert addresses_in(copy_for(prepared, ANN), field) == [SENDER, ANN]
    assert addresses_in(copy_for(prepared, BOB), field) == [SENDER, BOB]


def test_reply_to_alone_can_expose_recipients() -> None:
    data = message(f"From: {SENDER}", f"To: {SENDER}", f"Reply-To: {ANN}, {BOB}", f"Bcc: {ANN}, {BOB}")
    prepared = run(data, [ANN, BOB])
    assert prepared.decision.action is Action.SPLIT
    assert prepared.decision.exposed_fields == ("Reply-To",)
    assert addresses_in(copy_for(prepared, ANN), "Reply-To") == [ANN]


def test_trace_fields_naming_other_recipients_are_dropped() -> None:
    data = message(
        f"Received: from a by b for <{BOB}>; Wed, 25 Nov 2026 04:00:00 +0000",
        f"Delivered-To: {BOB}",
        f"X-Original-To: {BOB}",
        f"Return-Path: <{BOB}>",
        f"X-MDaemon-Deliver-To: {BOB}",
        f"From: {SENDER}",
        f"To: {ANN}, {BOB}",
    )
    prepared = run(data, [ANN, BOB])
    ann_copy = copy_for(prepared, ANN).headers
    assert BOB.encode() not in ann_copy
    assert b"Delivered-To" not in ann_copy
    bob_copy = copy_for(prepared, BOB).headers
    assert b"Delivered-To: bob@two.test" in bob_copy


def test_the_relays_own_received_line_names_only_a_single_recipient() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}, {BOB}")
    split = run(data, [ANN, BOB])
    assert f"for <{ANN}>".encode() in copy_for(split, ANN).headers
    bcc = run(data, [ANN, BOB], action="bcc")
    [undisclosed] = bcc.copies
    assert b"for <" not in undisclosed.headers
    assert addresses_in(undisclosed, "To") == []
    assert b"undisclosed-recipients:;" in undisclosed.headers


def test_dkim_signature_is_dropped_only_from_rewritten_copies() -> None:
    data = message("DKIM-Signature: v=1; d=coaching.test; b=abc", f"From: {SENDER}", f"To: {SENDER}, {ANN}, {BOB}")
    prepared = run(data, [SENDER, ANN, BOB])
    assert b"DKIM-Signature" in copy_for(prepared, SENDER).headers
    assert b"DKIM-Signature" not in copy_for(prepared, ANN).headers


def test_an_address_in_the_subject_is_refused_with_the_header_named() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}, {BOB}", f"Subject: Ann, meet Bob ({BOB})")
    with pytest.raises(PrivacyCheckFailed) as refused:
        run(data, [ANN, BOB])
    assert refused.value.code == 554 and refused.value.enhanced == "5.7.1"
    assert refused.value.leak.field == "Subject"
    assert "Subject" in refused.value.text


def test_more_than_min_recipients_threshold_is_respected() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}, {BOB}")
    prepared = run(data, [ANN, BOB], min_recipients=3)
    assert prepared.decision.action is Action.UNCHANGED
    assert [c.kind for c in prepared.copies] == ["original"]


def test_reject_mode_tells_the_person_what_to_do() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}", f"Cc: {BOB}")
    with pytest.raises(RelayError) as refused:
        run(data, [ANN, BOB], action="reject")
    assert refused.value.code == 550
    assert "Bcc" in refused.value.text and "To and Cc" in refused.value.text


def test_bcc_mode_with_one_protected_recipient_names_it_in_its_received_line() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}, {BOB}")
    [copy] = run(data, [ANN], action="bcc").copies
    assert f"for <{ANN}>".encode() in copy.headers
    assert BOB.encode() not in copy.headers


def test_an_address_in_a_comment_of_to_counts_as_visible() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN} (with {BOB})")
    prepared = run(data, [ANN, BOB])
    assert prepared.decision.action is Action.SPLIT
    assert_private(prepared, [ANN, BOB])


def test_an_encoded_display_name_in_reply_to_naming_another_recipient_is_filtered() -> None:
    data = message(f"From: {SENDER}", f"To: {ANN}, {BOB}", f"Reply-To: =?utf-8?q?{BOB}?= <{SENDER}>")
    prepared = run(data, [ANN, BOB])
    assert addresses_in(copy_for(prepared, ANN), "Reply-To") == [SENDER]
    assert BOB.encode() not in copy_for(prepared, ANN).headers


@pytest.mark.parametrize("action", ["split", "bcc"])
def test_one_envelope_recipient_with_many_in_to_still_gets_a_copy_showing_only_them(action: str) -> None:
    # Postfix's content filter with a recipient limit of 1 hands over one recipient per transaction.
    data = message(f"From: {SENDER}", f"To: Ann <{ANN}>, {BOB}", f"Cc: {CY}", "Subject: x")
    prepared = run(data, [BOB], action=action)
    (copy,) = prepared.copies
    assert copy.recipients == (BOB,)
    assert ANN not in copy.headers.decode() and CY not in copy.headers.decode()
    assert addresses_in(copy, "cc") == []
