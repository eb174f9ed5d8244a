"""RelaySMTP leans on private members of aiosmtpd's SMTP class; pyproject pins aiosmtpd below 1.5 for that.

Before that pin moves, these tests say whether the aiosmtpd installed still has every one of them.
"""

from __future__ import annotations

import inspect
import re

import aiosmtpd
import aiosmtpd.smtp

from relay.smtp.protocol import RelaySMTP

ASSIGNED = re.compile(r"self\.(_\w+)\s*(?::[^=\n]+)?=(?!=)")


def aiosmtpd_members() -> set[str]:
    """What SMTP defines: its methods and class attributes, and the attributes its code assigns."""
    return set(dir(aiosmtpd.smtp.SMTP)) | set(ASSIGNED.findall(inspect.getsource(aiosmtpd.smtp.SMTP)))


def private_members_relay_smtp_uses() -> set[str]:
    source = inspect.getsource(RelaySMTP)
    used = set(re.findall(r"(?:self|super\(\))\.(_[a-z]\w*)", source))
    own = set(ASSIGNED.findall(source)) | set(re.findall(r"def (_\w+)", source))
    return used - own


def test_the_scan_finds_the_private_members_relay_smtp_is_known_to_use() -> None:
    assert private_members_relay_smtp_uses() >= {
        "_call_handler_hook",
        "_handler_coroutine",
        "_reader",
        "_reset_timeout",
        "_set_post_data_state",
    }


def test_aiosmtpd_still_has_every_private_member_relay_smtp_uses() -> None:
    assert private_members_relay_smtp_uses() - aiosmtpd_members() == set()


def test_aiosmtpd_is_the_series_the_pin_allows() -> None:
    major, minor = (int(part) for part in aiosmtpd.__version__.split(".")[:2])
    assert (1, 4) <= (major, minor) < (1, 5)
