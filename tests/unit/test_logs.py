"""Log masking: addresses are shortened so logs can't be harvested; plain account names stay readable."""

from __future__ import annotations

from relay.logs import _mask_processor


def test_addresses_and_account_names_that_are_addresses_are_masked() -> None:
    event = _mask_processor(
        None,
        "info",
        {
            "mail_from": "coach@coaching.test",
            "recipients": ["ann@one.test", "bob@two.test"],
            "user": "kay@coaching.test",
            "login": "lee@office.test",
            "event": "message.accepted",
        },
    )
    assert event == {
        "mail_from": "c***@coaching.test",
        "recipients": ["a***@one.test", "b***@two.test"],
        "user": "k***@coaching.test",
        "login": "l***@office.test",
        "event": "message.accepted",
    }


def test_a_plain_account_name_stays_readable() -> None:
    assert _mask_processor(None, "info", {"user": "kay", "login": None}) == {"user": "kay", "login": None}
