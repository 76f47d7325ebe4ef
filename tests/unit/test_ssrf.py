"""The webhook address policy (``ser_shared.addresses``): every block of the IANA IPv4 and IPv6
Special-Purpose Address Registries, the IPv6 forms that carry an IPv4 address, and the allowlist.

The registries are written out below as data (as published in 2025), each row with the
registry's "Globally Reachable" value and the verdict this service gives. The expected verdict of
an address is that of the most specific row holding it; for a row whose verdict is EMBEDDED it is
worked out here, bit by bit, from the IPv4 address(es) inside, so the test does not lean on the
code under test or on ``ipaddress``'s own unwrapping.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from ser_shared import webhooks
from ser_shared.addresses import address_is_public, embedded_ipv4
from ser_shared.errors import BadRequest
from ser_shared.settings import Settings

DENY, EMBEDDED = "deny", "embedded"  # EMBEDDED: judged by the IPv4 address(es) inside
NA = None  # the registry's "N/A"


@dataclass(frozen=True)
class Row:
    block: str
    name: str
    globally_reachable: bool | None  # as the registry says; None for N/A
    verdict: str

    @property
    def network(self) -> IPv4Network | IPv6Network:
        return ipaddress.ip_network(self.block)


# Where the registry says True and we still deny, the reason is in ser_shared/addresses.py: the
# anycast service addresses (PCP, TURN, DNS-SD SRP, AS112, AMT) reach whichever server is nearest
# and are meant to be served inside a network (PCP's server is the site's own NAT gateway), and
# ORCHIDv2 / DET prefixes are identifiers for protocols above IP; no webhook receiver lives there.
IPV4_REGISTRY = [
    Row("0.0.0.0/8", '"This network"', False, DENY),
    Row("0.0.0.0/32", '"This host on this network"', False, DENY),
    Row("10.0.0.0/8", "Private-Use", False, DENY),
    Row("100.64.0.0/10", "Shared Address Space", False, DENY),
    Row("127.0.0.0/8", "Loopback", False, DENY),
    Row("169.254.0.0/16", "Link Local", False, DENY),
    Row("172.16.0.0/12", "Private-Use", False, DENY),
    Row("192.0.0.0/24", "IETF Protocol Assignments", False, DENY),
    Row("192.0.0.0/29", "IPv4 Service Continuity Prefix", False, DENY),
    Row("192.0.0.8/32", "IPv4 dummy address", False, DENY),
    Row("192.0.0.9/32", "Port Control Protocol Anycast", True, DENY),
    Row("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", True, DENY),
    Row("192.0.0.11/32", "DNS-SD Service Registration Protocol Anycast", True, DENY),
    Row("192.0.0.170/32", "NAT64/DNS64 Discovery", False, DENY),
    Row("192.0.0.171/32", "NAT64/DNS64 Discovery", False, DENY),
    Row("192.0.2.0/24", "Documentation (TEST-NET-1)", False, DENY),
    Row("192.31.196.0/24", "AS112-v4", True, DENY),
    Row("192.52.193.0/24", "AMT", True, DENY),
    # Deprecated by RFC 7526; anycast to whichever relay is nearest, like the services above.
    Row("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", NA, DENY),
    Row("192.88.99.2/32", "6a44-relay anycast address", False, DENY),
    Row("192.168.0.0/16", "Private-Use", False, DENY),
    Row("192.175.48.0/24", "Direct Delegation AS112 Service", True, DENY),
    Row("198.18.0.0/15", "Benchmarking", False, DENY),
    Row("198.51.100.0/24", "Documentation (TEST-NET-2)", False, DENY),
    Row("203.0.113.0/24", "Documentation (TEST-NET-3)", False, DENY),
    Row("240.0.0.0/4", "Reserved", False, DENY),
    Row("255.255.255.255/32", "Limited Broadcast", False, DENY),
]

IPV6_REGISTRY = [
    Row("::1/128", "Loopback Address", False, DENY),
    Row("::/128", "Unspecified Address", False, DENY),
    # Never on the wire as such: a dual-stack socket connects to the IPv4 address inside.
    Row("::ffff:0:0/96", "IPv4-mapped Address", False, EMBEDDED),
    # Reachable through a NAT64 gateway, which connects to the IPv4 address inside.
    Row("64:ff9b::/96", "IPv4-IPv6 Translat.", True, EMBEDDED),
    Row("64:ff9b:1::/48", "IPv4-IPv6 Translat.", False, DENY),
    Row("100::/64", "Discard-Only Address Block", False, DENY),
    Row("100:0:0:1::/64", "Dummy IPv6 Prefix", False, DENY),
    Row("2001::/23", "IETF Protocol Assignments", False, DENY),
    # Tunnelled over UDP through the server to the (obfuscated) client IPv4: both must be public.
    Row("2001::/32", "TEREDO", NA, EMBEDDED),
    Row("2001:1::1/128", "Port Control Protocol Anycast", True, DENY),
    Row("2001:1::2/128", "Traversal Using Relays around NAT Anycast", True, DENY),
    Row("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", True, DENY),
    Row("2001:2::/48", "Benchmarking", False, DENY),
    Row("2001:3::/32", "AMT", True, DENY),
    Row("2001:4:112::/48", "AS112-v6", True, DENY),
    Row("2001:10::/28", "Deprecated (previously ORCHID)", NA, DENY),
    Row("2001:20::/28", "ORCHIDv2", True, DENY),
    Row("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", True, DENY),
    Row("2001:db8::/32", "Documentation", False, DENY),
    # Relayed to the IPv4 address after the prefix.
    Row("2002::/16", "6to4", NA, EMBEDDED),
    Row("2620:4f:8000::/48", "Direct Delegation AS112 Service", True, DENY),
    Row("3fff::/20", "Documentation", False, DENY),
    Row("5f00::/16", "Segment Routing (SRv6) SIDs", False, DENY),
    Row("fc00::/7", "Unique-Local", False, DENY),
    Row("fe80::/10", "Link-Local Unicast", False, DENY),
]

# Not in the special-purpose registries but never a webhook receiver: multicast, deprecated
# IPv6 forms (RFC 4291, RFC 3879), and space IANA has not allocated.
OTHER_SPECIAL = [
    Row("224.0.0.0/4", "Multicast", NA, DENY),
    Row("ff00::/8", "Multicast", NA, DENY),
    Row("fec0::/10", "Site-local (deprecated)", NA, DENY),
    Row("::/96", "IPv4-compatible (deprecated)", NA, DENY),
    Row("::ffff:0:0:0/96", "IPv4-translated (SIIT, obsolete)", NA, DENY),
    Row("4000::/3", "Reserved by IETF", NA, DENY),
    Row("e000::/4", "Reserved by IETF", NA, DENY),
]

ROWS = IPV4_REGISTRY + IPV6_REGISTRY + OTHER_SPECIAL


def _embedded(addr: IPv6Address) -> list[IPv4Address]:
    """The IPv4 addresses inside, by the bit layouts of RFC 4291, 6052, 3056 and 4380."""
    bits = int(addr)
    if addr in IPv6Network("2001::/32"):  # Teredo: server in bits 64-95, client inverted in 0-31
        return [IPv4Address((bits >> 64) & 0xFFFF_FFFF), IPv4Address(~bits & 0xFFFF_FFFF)]
    if addr in IPv6Network("2002::/16"):  # 6to4: the 32 bits after the prefix
        return [IPv4Address((bits >> 80) & 0xFFFF_FFFF)]
    return [IPv4Address(bits & 0xFFFF_FFFF)]  # IPv4-mapped and NAT64: the last 32 bits


def expected_public(addr: IPv4Address | IPv6Address) -> bool:
    """The verdict of the most specific row holding ``addr``; public if none does."""
    rows = [row for row in ROWS if row.network.version == addr.version and addr in row.network]
    if not rows:
        return True
    row = max(rows, key=lambda r: r.network.prefixlen)
    if row.verdict == EMBEDDED:
        assert isinstance(addr, IPv6Address)
        return all(expected_public(v4) for v4 in _embedded(addr))
    return False


def _samples() -> list[tuple[str, str]]:
    """(row, address) for the first, a middle and the last address of every row."""
    cases = []
    for row in ROWS:
        net = row.network
        for addr in dict.fromkeys((net[0], net[net.num_addresses // 2], net[-1])):
            cases.append((f"{row.block} {row.name}", str(addr)))
    return cases


@pytest.mark.parametrize(("row", "address"), _samples(), ids=[f"{r}@{a}" for r, a in _samples()])
def test_every_special_purpose_block(row: str, address: str) -> None:
    addr = ipaddress.ip_address(address)
    assert address_is_public(addr) is expected_public(addr), row


def test_registry_table_is_whole() -> None:
    """Guards the data: the rows the issue names are there, and every row the registry marks
    globally reachable is either denied (with the reason above) or unwrapped."""
    blocks = {row.block for row in ROWS}
    for needed in ("100.64.0.0/10", "192.0.0.9/32", "192.0.0.10/32", "2001:1::1/128", "2001:1::2/128",
                   "2001:3::/32", "2001:4:112::/48", "2001:20::/28", "2620:4f:8000::/48", "2002::/16",
                   "64:ff9b::/96", "64:ff9b:1::/48", "2001::/32", "fec0::/10"):
        assert needed in blocks
    assert len(IPV4_REGISTRY) == 27 and len(IPV6_REGISTRY) == 25
    reachable = [row for row in IPV4_REGISTRY + IPV6_REGISTRY if row.globally_reachable]
    assert {row.verdict for row in reachable} == {DENY, EMBEDDED}
    assert [row.block for row in reachable if row.verdict == EMBEDDED] == ["64:ff9b::/96"]


def test_the_middle_of_an_embedded_block_can_be_public() -> None:
    """The walk above would pass for a guard that refused every wrapped form: these middles embed
    128.0.0.0, an ordinary address, and must be admitted."""
    for address in ("::ffff:128.0.0.0", "64:ff9b::8000:0", "2002:8000::"):
        assert expected_public(ipaddress.ip_address(address))
        assert address_is_public(address)


@pytest.mark.parametrize("address", [
    "100.100.100.200",  # cloud metadata in the shared address space
    "2002:a00:1::1",  # 6to4 around 10.0.0.1
    "2002:7f00:1::",  # 6to4 around 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 around 169.254.169.254
    "fec0::1",  # site-local
    "64:ff9b::a00:1",  # NAT64 to 10.0.0.1
    "64:ff9b::169.254.169.254",  # NAT64 to the metadata service
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:169.254.169.254",
    "::127.0.0.1",  # IPv4-compatible (deprecated; sit0 would tunnel it)
    "2001:0:4136:e378:8000:63bf:3f57:fefe",  # Teredo: public server, client 192.168.1.1
    "2001:0:a00:1:8000:63bf:f7f7:f7f7",  # Teredo: server 10.0.0.1, client 8.8.8.8
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # RFC 4380's example: client 192.0.2.45 (documentation)
    "224.0.0.251", "ff02::1", "ff0e::1", "233.252.0.1",  # multicast, local and global scope
])
def test_probe_addresses_are_refused(address: str) -> None:
    assert not address_is_public(address)


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001:81b::200e",
    "2002:808:808::1",  # 6to4 around 8.8.8.8
    "64:ff9b::808:808",  # NAT64 to 8.8.8.8
    "::ffff:1.1.1.1",  # IPv4-mapped 1.1.1.1
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo: server 65.54.227.120, client 8.8.8.8
])
def test_ordinary_public_addresses_pass(address: str) -> None:
    assert address_is_public(address)


def test_unwrapping_finds_the_addresses_inside() -> None:
    assert embedded_ipv4(IPv6Address("2002:a9fe:a9fe::1")) == (IPv4Address("169.254.169.254"),)
    assert embedded_ipv4(IPv6Address("64:ff9b::a00:1")) == (IPv4Address("10.0.0.1"),)
    assert embedded_ipv4(IPv6Address("::ffff:127.0.0.1")) == (IPv4Address("127.0.0.1"),)
    assert embedded_ipv4(IPv6Address("2001:0:4136:e378:8000:63bf:3f57:fefe")) == \
        (IPv4Address("65.54.227.120"), IPv4Address("192.168.1.1"))
    assert embedded_ipv4(IPv6Address("2606:4700:4700::1111")) is None


def test_python_quirks_do_not_leak_through() -> None:
    """Addresses this Python's ``is_global`` calls global that the policy must still refuse. If a
    later Python fixes one, the policy's answer stays the same; only this premise changes."""
    quirks = ["224.0.0.1", "192.0.0.8", "192.88.99.1", "fec0::1", "3fff::1", "2002:a00:1::",
              "64:ff9b::a00:1", "64:ff9b:1::1"]
    for address in quirks:
        assert not address_is_public(address), address
    assert any(ipaddress.ip_address(a).is_global for a in quirks)  # at least some are quirks here


@pytest.mark.parametrize("url", ["http://100.100.100.200/latest/meta-data/", "http://[2002:a9fe:a9fe::1]/",
                                 "http://[fec0::1]/", "http://[64:ff9b::a00:1]/", "http://[::ffff:127.0.0.1]:8080/",
                                 "http://192.0.0.9/", "http://[2001:0:4136:e378:8000:63bf:3f57:fefe]/"])
def test_the_guard_refuses_them_at_the_url(url: str) -> None:
    with pytest.raises(BadRequest) as err:
        webhooks.check_url(url, Settings(env="test"))
    assert err.value.code == "webhook_url_refused" and "non-public address" in err.value.message


def test_public_literals_pass_the_guard() -> None:
    for url in ("http://8.8.8.8/hook", "https://[2606:4700:4700::1111]/hook", "http://[2002:808:808::1]/"):
        assert webhooks.check_url(url, Settings(env="test")) == url


def test_allowlist_still_admits_a_private_range() -> None:
    url = "http://100.100.100.200/hook"
    with pytest.raises(BadRequest):
        webhooks.check_url(url, Settings(env="test"))
    assert webhooks.check_url(url, Settings(env="test", webhook_allow="100.64.0.0/10")) == url
    assert webhooks.check_url("http://10.1.2.3/", Settings(env="test", webhook_allow="hooks.internal, 10.0.0.0/8"))
    assert webhooks.check_url("http://[fd00::5]/", Settings(env="test", webhook_allow="fd00::/8"))
    # A network admits only what it holds.
    with pytest.raises(BadRequest):
        webhooks.check_url("http://10.1.2.3/", Settings(env="test", webhook_allow="192.168.0.0/16"))
