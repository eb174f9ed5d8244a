"""The address-list parser: lenient where senders are sloppy, never silent, linear in the input."""

from __future__ import annotations

import pytest

from relay.core.addresses import Mailbox, format_mailbox, mentioned_addresses, normalize_address, parse_address_list


@pytest.mark.parametrize(
    ("value", "keys"),
    [
        ("a@b.test; d@e.test", ["a@b.test", "d@e.test"]),  # the stdlib keeps only a@b.test
        ("a@b.test d@e.test", ["a@b.test", "d@e.test"]),
        ("<a@b.test> <d@e.test>", ["a@b.test", "d@e.test"]),
        ("a@b.test>d@e.test", ["a@b.test", "d@e.test"]),
        ("Friends: a@b.test, d@e.test;, x@y.test", ["a@b.test", "d@e.test", "x@y.test"]),
        ("undisclosed-recipients:;", []),
        ("<@hub.test,@relay.test:a@b.test>", ["a@b.test"]),
        ("a (comment (nested)) @ (x) b.test", ["a@b.test"]),
        ('"a\\"b"@b.test', ['a"b@b.test']),
        ("A@XN--BCHER-KVA.TEST", ["a@bücher.test"]),
        ("d@e.test <a@b.test>", ["a@b.test", "d@e.test"]),  # an unquoted address in a name is readable
        ('"d@e.test" <a@b.test>', ["a@b.test"]),
        ("Ann <a@b.test", ["a@b.test"]),
        ("no address here", []),
        ("jdoe@test   . example, ann . lee @ one.test", ["jdoe@test.example", "ann.lee@one.test"]),  # obsolete spacing
    ],
)
def test_every_address_is_found(value: str, keys: list[str]) -> None:
    assert [m.key for m in parse_address_list(value)] == keys


def test_display_names_and_groups_are_kept() -> None:
    first, second = parse_address_list('Team: "Smith, Ann" <a@b.test>, =?utf-8?q?J=C3=B6rg?= <j@b.test>;')
    assert (first.display_name, first.group) == ("Smith, Ann", "Team")
    assert second.display_name == "Jörg"


def test_mentioned_addresses_look_inside_comments_and_quotes() -> None:
    text = 'from x by y (for "ann"@one.test) <b@c.test>; ("bob@two.test")'
    assert mentioned_addresses(text) == {"ann@one.test", "b@c.test", "bob@two.test"}


def test_mentioned_addresses_read_free_text_both_ways() -> None:
    assert {"bob@two.test", "ann@one.test"} <= mentioned_addresses("Write to bob@two.test. Or ann@one. test")


def test_normalize_address_is_case_and_idna_insensitive() -> None:
    assert normalize_address('"Ann"@Xn--Bcher-Kva.Test.') == "ann@bücher.test"


@pytest.mark.parametrize(
    ("display_name", "formatted"),
    [
        ("Ann", "Ann <a@b.test>"),
        ("Smith, Ann", '"Smith, Ann" <a@b.test>'),
        ("Jörg", "=?utf-8?b?SsO2cmc=?= <a@b.test>"),
        ("J\udcf6rg", "a@b.test"),  # Latin-1 bytes of unknown charset: the address alone
    ],
)
def test_format_mailbox(display_name: str, formatted: str) -> None:
    assert format_mailbox(Mailbox(display_name, "a@b.test")) == formatted


def test_mentioned_addresses_decode_encoded_words_and_urls() -> None:
    assert "bob@two.test" in mentioned_addresses("=?utf-8?q?bob@two.test?= <a@b.test>")
    assert "c@d.test" in mentioned_addresses("<mailto:?to=c@d.test>, [x c@d.test")
