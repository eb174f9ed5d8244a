"""The leak check on its own: every spelling of a hidden address is found, other addresses are not."""

from __future__ import annotations

import pytest

from relay.core.leakcheck import LeakChecker

PROTECTED = frozenset({"ann@one.test", 'a"b@two.test', "o'brien@three.test", "bo b@four.test", "jo@bücher.test"})


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
    ],
)
def test_other_addresses_are_not_leaks(header: bytes) -> None:
    assert LeakChecker(PROTECTED).find(header, frozenset()) is None


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
