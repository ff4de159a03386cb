"""Webhook pieces that need no server: quota-warning thresholds and the address guard."""

from __future__ import annotations

import pytest

from app.core.errors import BadRequest
from app.core.webhooks import DeliveryRefused, QuotaWarnings, _resolve, validate_url


@pytest.mark.parametrize(
    ("before", "after", "limit", "expected"),
    [
        (8, 9, 10, True),  # reaches 90 %
        (9, 10, 10, True),  # reaches 100 %
        (7, 8, 10, False),
        (10, 11, 10, False),  # already past every threshold
        (0, 950, 1000, True),  # one big jump over 90 %
        (900, 950, 1000, False),  # 90 % was reached before
        (5, 5, 10, False),
    ],
)
def test_a_warning_fires_once_when_use_reaches_a_threshold(
    before: int, after: int, limit: int, expected: bool
) -> None:
    assert QuotaWarnings([90, 100]).crossed(before, after, limit) is expected


def test_no_thresholds_or_no_limit_means_no_warning() -> None:
    assert not QuotaWarnings([]).crossed(0, 10, 10)
    assert not QuotaWarnings([90]).crossed(0, 10, None)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
async def test_deliveries_to_private_addresses_are_refused(host: str) -> None:
    with pytest.raises(DeliveryRefused):
        await _resolve(host, 80, allow_private=False)
    assert await _resolve(host, 80, allow_private=True) in ("127.0.0.1", "::1")


async def test_an_unresolvable_name_is_refused_not_raised() -> None:
    with pytest.raises(DeliveryRefused):
        await _resolve("no-such-host.invalid", 80, allow_private=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://printer.local/",
        "http://x.internal/",
    ],
)
def test_urls_naming_private_hosts_are_refused(url: str) -> None:
    with pytest.raises(BadRequest):
        validate_url(url, allow_private=False)
    assert validate_url(url, allow_private=True) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://exa mple.com/",
        "http://a..example.com/",
        "http://-a.example.com/",
        "http://" + "a" * 64 + ".example.com/",
        # Read as IPv4 addresses by resolvers and browsers.
        "http://2130706433/",
        "http://127.1/",
        "http://0x7f.1/",
        "http://example.com:0/",
        "http://example.com:99999/",
    ],
)
def test_urls_without_a_valid_host_or_port_are_refused(url: str) -> None:
    for allow_private in (False, True):
        with pytest.raises(BadRequest):
            validate_url(url, allow_private=allow_private)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com:8443/in?x=1",
        "http://a_b.example.com/",
        "http://example.com./",
        "http://bücher.example/",
        "http://8.8.8.8/",
        "http://[2606:4700::1111]:65535/",
        "http://example.123abc/",
    ],
)
def test_urls_naming_public_hosts_are_taken(url: str) -> None:
    assert validate_url(url, allow_private=False) == url


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::1",  # local-use NAT64
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "::ffff:10.0.0.1",  # IPv4-mapped
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo whose client is 10.0.0.1
        "::ffff:0:7f00:1",  # IPv4-translated (SIIT) 127.0.0.1
        "fec0::1",  # site-local
    ],
)
def test_ipv6_addresses_leading_to_private_ipv4_are_not_public(address: str) -> None:
    with pytest.raises(BadRequest):
        validate_url(f"http://[{address}]/", allow_private=False)


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111"])
def test_ipv6_addresses_leading_to_public_ones_are_allowed(address: str) -> None:
    assert validate_url(f"http://[{address}]/", allow_private=False)
