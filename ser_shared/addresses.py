"""Which IP addresses a webhook may be sent to: deny by default, admit only globally routable ones.

``address_is_public`` is the one rule. An IPv6 address that carries the IPv4 address its packets
end up at (IPv4-mapped, 6to4, NAT64, Teredo) is judged by the IPv4 address inside, since that is
where the connection goes: ``2002:a00:1::`` reaches 10.0.0.1 through a 6to4 relay, and
``::ffff:127.0.0.1`` is loopback on a dual-stack socket. Any other address must be global both to
``ipaddress`` and to the deny lists below, which repeat the IANA special-purpose registries
because ``is_global`` differs between Python releases (3.11.7 calls multicast, 192.0.0.8,
fec0::/10 site-local, 3fff::/20 documentation and the 6to4 and NAT64 prefixes global).
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address

# Some of these the IANA registry calls globally reachable: the anycast service addresses
# 192.0.0.9 (PCP), 192.0.0.10 (TURN), 192.0.0.11 (DNS-SD SRP), AS112 and AMT. They are denied
# with the rest of their blocks: an anycast address reaches whichever server is nearest, these
# services are meant to be run inside a network (PCP's server is the site's own NAT gateway; any
# operator may run an AS112 node for its users), so from the worker they may reach an internal
# machine, and no webhook receiver lives there.
_DENIED_V4 = tuple(IPv4Network(net) for net in (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # private use
    "100.64.0.0/10",  # shared address space (carrier NAT; 100.100.100.200 is a cloud metadata service)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link local (169.254.169.254 is the usual cloud metadata service)
    "192.0.0.0/24",  # IETF protocol assignments, all of it (see above)
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",  # documentation
    "192.31.196.0/24", "192.175.48.0/24",  # AS112 DNS sinks (see above)
    "192.52.193.0/24",  # AMT relays (see above)
    "192.88.99.0/24",  # 6to4 relay anycast, deprecated (RFC 7526), and the 6a44 relay in it
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, with 255.255.255.255 (limited broadcast)
))

# IANA hands registries addresses from 2000::/3 only; everything outside it is special (loopback,
# unspecified, IPv4-compatible ::/96 that Linux's sit0 tunnels to the IPv4 inside, 64:ff9b:1::/48
# local-use translation, 100::/64 discard, 5f00::/16 SRv6, fc00::/7 unique local, fe80::/10 link
# local, fec0::/10 site local, ff00::/8 multicast) or not yet allocated.
_GLOBAL_UNICAST_V6 = IPv6Network("2000::/3")
_DENIED_V6 = tuple(IPv6Network(net) for net in (
    # IETF protocol assignments. Teredo (2001::/32) is judged by the addresses inside it before
    # this list applies. The rest: anycast service addresses (see the IPv4 list), benchmarking,
    # AMT and AS112 (see above), and ORCHID, ORCHIDv2 and drone (DET) identifiers, which name
    # hosts for protocols above IP rather than locate web servers.
    "2001::/23",
    "2001:db8::/32", "3fff::/20",  # documentation
    "2620:4f:8000::/48",  # AS112 direct delegation (see above)
))

_NAT64 = IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix: the last 32 bits are IPv4


def embedded_ipv4(addr: IPv6Address) -> tuple[IPv4Address, ...] | None:
    """The IPv4 addresses that a connection to ``addr`` is carried to, or None if it carries none.

    IPv4-mapped (``::ffff:0:0/96``) and NAT64 (``64:ff9b::/96``) give the address in their last 32
    bits, 6to4 (``2002::/16``) the one after the prefix; Teredo (``2001::/32``) gives the server
    and the (de-obfuscated) client, and both must be public, since the packet passes through both.
    """
    if addr.ipv4_mapped is not None:
        return (addr.ipv4_mapped,)
    if addr in _NAT64:
        return (IPv4Address(int(addr) & 0xFFFF_FFFF),)
    if addr.sixtofour is not None:
        return (addr.sixtofour,)
    if addr.teredo is not None:
        return addr.teredo
    return None


def _direct_is_public(addr: IPAddress) -> bool:
    """``addr`` itself (nothing unwrapped) is globally routable: every test has to agree."""
    if (addr.is_multicast or addr.is_reserved or addr.is_unspecified or addr.is_loopback
            or addr.is_link_local or addr.is_private or not addr.is_global):
        return False
    if isinstance(addr, IPv4Address):
        return not any(addr in net for net in _DENIED_V4)
    return (not addr.is_site_local and addr in _GLOBAL_UNICAST_V6
            and not any(addr in net for net in _DENIED_V6))


def address_is_public(addr: IPAddress | str) -> bool:
    """Whether a webhook may connect to ``addr``: True only for a globally routable address.

    Raises ValueError for a string that is not an IP address.
    """
    if isinstance(addr, str):
        addr = ipaddress.ip_address(addr)
    if isinstance(addr, IPv6Address):
        inner = embedded_ipv4(addr)
        if inner is not None:
            return all(_direct_is_public(v4) for v4 in inner)
    return _direct_is_public(addr)
