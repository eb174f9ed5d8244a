"""The leak check: every spelling of a hidden address is found, other addresses are not; and the policy agrees."""

from __future__ import annotations

import pytest

from relay.config.models import PolicyConfig
from relay.core.leakcheck import LeakChecker
from relay.core.message import parse_message
from relay.core.pipeline import PrivacyCheckFailed
from relay.core.policy import Action, Envelope, decide
from tests.support.mailkit import copy_for, message, run

PROTECTED = frozenset({"ann@one.test", 'a"b@two.test', "o'brien@three.test", "bo b@four.test", "jo@bücher.test"})
# For the person's reading: an address glued to a quote, a slash or a field name is still an address.
ANN, BOB, CARA, DORTE = "ann@a.example", "bob@b.example", "cara@c.example", "dorte@müller.example"
GLUED = frozenset({ANN, BOB, CARA, DORTE})


@pytest.mark.parametrize(
    ("header", "address"),
    [
        (b"To: ann@one.test\r\n", "ann@one.test"),
        (b"To: ANN@One.TEST\r\n", "ann@one.test"),
        (b"To: Someone <ann@one.test.>\r\n", "ann@one.test"),
        (b"Subject: =?utf-8?q?ann=40one=2Etest?=\r\n", "ann@one.test"),
        (b"Subject: =?utf-8?b?YW5uQG9uZS50ZXN0?=\r\n", "ann@one.test"),
        (b"Subject: =?utf-8?q?ann?= =?utf-8?q?=40one=2Etest?=\r\n", "ann@one.test"),
        (b"To: ann (work) @ (main) one.test\r\n", "ann@one.test"),
        (b"To: ann@\r\n one.test\r\n", "ann@one.test"),
        (b"List-Unsubscribe: <mailto:ann%40one.test>\r\n", "ann@one.test"),
        (b'X-Note: ("ann@one.test")\r\n', "ann@one.test"),
        (b'To: "a\\"b"@two.test\r\n', 'a"b@two.test'),
        (b"To: o'brien@three.test\r\n", "o'brien@three.test"),
        (b'To: "bo b"@four.test\r\n', "bo b@four.test"),
        (b"To: jo@xn--bcher-kva.test\r\n", "jo@bücher.test"),
        (b"To: jo@B\xc3\x9cCHER.test\r\n", "jo@bücher.test"),
        (b"X-Odd: ann@one\xe3\x80\x82test\r\n", "ann@one.test"),
        (b"no colon ann@one.test\r\n", "ann@one.test"),
        (b"Reply-To: ann@one . test\r\n", "ann@one.test"),
        (b"Subject: write to ann@one.test. Thanks\r\n", "ann@one.test"),
    ],
)
def test_every_spelling_is_found(header: bytes, address: str) -> None:
    leak = LeakChecker(PROTECTED).find(b"From: me@here.test\r\n" + header, frozenset())
    assert leak is not None
    assert leak.address == address


@pytest.mark.parametrize(
    "header",
    [
        b"To: xann@one.test\r\n",
        b"To: jo.ann@one.test\r\n",
        b"To: ann@one.test.example\r\n",
        b"To: ann@sub.one.test\r\n",
        b"To: b@two.test\r\n",
        b"Message-ID: <123.ann@one.tests>\r\n",
        b"To: joann@a.example, Ann <bann@a.example>\r\n",
        b"To: jo.ann@a.example, jo+ann@a.example, jo_ann@a.example, jo-ann@a.example\r\n",
        b"To: ann@a.example.org, ann@a.examples, ann@a.example-mail.org, ann@a.example2\r\n",
    ],
)
def test_other_addresses_are_not_leaks(header: bytes) -> None:
    assert LeakChecker(PROTECTED | GLUED).find(header, frozenset()) is None


def test_the_copys_own_address_may_show() -> None:
    checker = LeakChecker(PROTECTED)
    assert checker.find(b"To: ann@one.test\r\n", frozenset({"ann@one.test"})) is None
    leak = checker.find(b"To: ann@one.test\r\nCc: jo@bucher.test, o'brien@three.test\r\n", frozenset({"ann@one.test"}))
    assert leak is not None and leak.field == "Cc"


def test_the_leak_names_its_field() -> None:
    leak = LeakChecker(frozenset({"ann@one.test"})).find(
        b"To: x@y.test\r\nReply-To: Ann <ann@one.test>\r\n", frozenset()
    )
    assert leak is not None and (leak.field, leak.address) == ("Reply-To", "ann@one.test")


@pytest.mark.parametrize(
    ("header", "address"),
    [
        (b'Subject: team "b"cara@c.example\r\n', CARA),
        (b"Group:dorte@xn--mller-kva.example/\r\n", DORTE),
        (b"bob@b.example-Note: hello\r\n", BOB),
        (b"Sender: \\e@x.example)ann@a.example--b\r\n", ANN),
        (b"X-Note: (ann@a.example)\r\n", ANN),
        (b"X-Note: <ann@a.example>-\r\n", ANN),
        (b"X-Note: ann@a.example-\r\n", ANN),
        (b"X-Note: ann@a.example_x\r\n", ANN),
        (b"X-Note: ann\\@a.example\r\n", ANN),
        (b"X-Note: =?utf-8?q?x=22ann=40a=2Eexample?=\r\n", ANN),
        (b"X-Note: \xef\xbd\x81nn\xef\xbc\xa0a.example\r\n", ANN),  # full-width a and @
        (b'X-Note: "cara"@c.example\r\n', CARA),
        (b"Subject: =?utf-8?q?ann=2540a=2Eexample?=\r\n", ANN),  # %40 inside an encoded word
    ],
)
def test_an_address_a_person_reads_is_found_whatever_is_glued_to_it(header: bytes, address: str) -> None:
    leak = LeakChecker(GLUED).find(b"From: me@here.test\r\n" + header, frozenset())
    assert leak is not None
    assert leak.address == address
    assert leak.field == header.partition(b":")[0].decode()


def test_joann_and_ann_in_one_message_see_only_themselves() -> None:
    checker = LeakChecker(frozenset({"ann@club.example", "joann@club.example"}))
    headers = b"To: Ann <ann@club.example>\r\nReply-To: me@club.test\r\n"
    assert checker.find(headers, frozenset({"ann@club.example"})) is None
    assert checker.find(b"To: Jo Ann <joann@club.example>\r\n", frozenset({"joann@club.example"})) is None
    leak = checker.find(headers, frozenset({"joann@club.example"}))
    assert leak is not None and leak.address == "ann@club.example"


def test_header_fields_at_the_top_of_the_body_are_read() -> None:
    checker = LeakChecker(GLUED)
    for body in (
        b"To: ann@a.example,\r\n bob@b.example\r\nSubject: t\r\n\r\nhello\r\n",
        b"Cc: bob@b.example\r\r\nSubject: t\r\r\n\r\r\nhello\r\r\n",  # CR CR LF line endings
        b"Subject: t\rCc: bob@b.example\r\rhello\r",  # lone CR
    ):
        leak = checker.find(b"From: me@here.test\r\n", frozenset({ANN}), body)
        assert leak is not None and leak.in_body and leak.address == BOB, body


def test_the_body_is_read_only_while_it_looks_like_header_fields() -> None:
    checker = LeakChecker(GLUED)
    for body in (
        b"Hello,\r\nTo: bob@b.example\r\n",
        b"Subject: t\r\n\r\nTo: bob@b.example\r\n",
        b"Dear Bob, write to bob@b.example: thanks\r\n",
    ):
        assert checker.find(b"From: me@here.test\r\n", frozenset({ANN}), body) is None, body


@pytest.mark.parametrize("to", ["To: ann@a.example, bob@b.example", "To: undisclosed-recipients:;"])
@pytest.mark.parametrize(
    ("field", "name"),
    [
        ('Subject: team "b"cara@c.example', "Subject"),
        ("bob@b.example-Note: hello", "bob@b.example-Note"),
        ("X-Sender: \\e@x.example)ann@a.example--b", "X-Sender"),
    ],
)
def test_a_message_showing_a_glued_address_is_refused_naming_the_field(to: str, field: str, name: str) -> None:
    data = message("From: coach@coaching.test", to, field)
    with pytest.raises(PrivacyCheckFailed) as refused:
        run(data, [ANN, BOB, CARA])
    assert refused.value.code == 554 and refused.value.leak.field == name
    assert name in refused.value.text


def test_the_policy_reads_as_the_check_does() -> None:
    # Nobody in To/Cc, but an address a person reads in another field: exposed, so not sent as written.
    data = message("From: coach@coaching.test", "To: undisclosed-recipients:;", "X-Original-To: ann@a.example--b")
    decision = decide(Envelope("coach@coaching.test", (ANN, BOB)), parse_message(data), PolicyConfig().settings())
    assert decision.action is Action.SPLIT and decision.exposed_fields == ("X-Original-To",)


def test_a_message_whose_text_starts_with_recipient_fields_is_refused() -> None:
    data = message("From: coach@coaching.test", body=b"To: ann@a.example, bob@b.example\r\nSubject: t\r\n\r\nhello\r\n")
    with pytest.raises(PrivacyCheckFailed) as refused:
        run(data, [ANN, BOB])
    assert refused.value.leak.in_body and "the text of the message starts with" in refused.value.text


def test_fields_the_rewrite_filters_are_filtered_by_the_same_reading() -> None:
    data = message(
        "From: coach@coaching.test",
        "To: undisclosed-recipients:;",
        "X-Original-To: ann@a.example--b",
        "Reply-To: coach@coaching.test, bob@b.example--b",
    )
    prepared = run(data, [ANN, BOB])
    assert prepared.decision.action is Action.SPLIT
    assert b"ann@a.example" not in copy_for(prepared, BOB).headers
    assert b"bob@b.example" not in copy_for(prepared, ANN).headers
    assert b"Reply-To: coach@coaching.test\r\n" in copy_for(prepared, ANN).headers
