"""The config model: the validated config file and command-line options as frozen values, their
defaults and limits. Pure: no I/O, and nothing of parsing or merging (those build on this).

:class:`MasqConfig` is what a config file says once validated; :class:`AgentOptions` the flags
shared with the upstream agent (its ``--to-ports`` intervals are :class:`~masqd.config.flags.PortRange`
values, defined with their parser in :mod:`masqd.config.flags`); :func:`default_config` the config
used when no file is present.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from masqd.cidrs import Network, parse_cidr
from masqd.config.flags import PortRange, validate_chain_name
from masqd.errors import Problem

DEFAULT_CONFIG_PATH = "/etc/config/ip-masq-agent"
DEFAULT_MASQ_CHAIN = "IP-MASQ-AGENT"

#: RFC 1918 private ranges: the upstream default non-masquerade list.
RFC1918_CIDRS: tuple[str, ...] = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
#: Added to the defaults by ``--nomasq-all-reserved-ranges`` (the upstream list, same order).
RESERVED_CIDRS: tuple[str, ...] = (
    "100.64.0.0/10",  # RFC 6598 carrier-grade NAT
    "192.0.0.0/24",  # RFC 6890 IETF protocol assignments
    "192.0.2.0/24",  # RFC 5737 TEST-NET-1
    "192.88.99.0/24",  # RFC 7526 6to4 relay anycast
    "198.18.0.0/15",  # RFC 6815 benchmarking
    "198.51.100.0/24",  # RFC 5737 TEST-NET-2
    "203.0.113.0/24",  # RFC 5737 TEST-NET-3
    "240.0.0.0/4",  # RFC 5735 former class E
)

#: An interface name masqd accepts (``outputInterfaces``, ``explain --out-interface``): 1-15
#: characters (the kernel's IFNAMSIZ less its NUL) of letters, digits and ``_ . - @``, not starting
#: with ``-``, not ``.`` or ``..``. Narrower than the kernel (which takes almost any byte), so that
#: a name can never change the meaning of a rule text (``-o -j`` would); ``outputInterfaces`` may
#: also end one in ``+`` (a prefix wildcard).
INTERFACE_NAME = re.compile(r"[A-Za-z0-9_.@][A-Za-z0-9_.@-]{0,14}")

#: The keys holding a list of CIDRs, and the config field of each (a null value is an empty list):
#: upstream's, then the decision model's (:data:`OTHER_CIDR_LISTS`).
CIDR_LIST_KEYS = {
    "nonMasqueradeCIDRs": "non_masquerade_cidrs",
    "masqueradeCIDRs": "masquerade_cidrs",
    "masqueradeSourceCIDRs": "masquerade_source_cidrs",
    "nonMasqueradeSourceCIDRs": "non_masquerade_source_cidrs",
}
OTHER_CIDR_LISTS = {key: field for key, field in CIDR_LIST_KEYS.items() if key != "nonMasqueradeCIDRs"}

_SECOND_NS = 1_000_000_000
#: Largest config accepted, in bytes (a file) or characters (a ConfigMap's text). A file listing
#: 100k CIDRs is about 2 MB, so this leaves room for any real config while a runaway file (a log
#: written to the wrong path, a 50 MB upload) is refused at once, before it is read into memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024

#: Shortest resync honoured, in nanoseconds (100 ms). Each resync reads the kernel's rules back
#: (see "No-op resync cost" in benchmarks/RESULTS.md); at 1 ms that is a busy loop keeping a CPU
#: core saturated, so shorter values are raised to this, with a warning.
MIN_RESYNC_INTERVAL_NS = 100_000_000


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """The command-line flags shared with the upstream agent, validated.

    masq_chain: nat chain masqd owns (``--masq-chain``, default ``IP-MASQ-AGENT``); checked by
        :func:`~masqd.config.flags.validate_chain_name` when the options are built.
    nomasq_all_reserved_ranges: default list also holds every RFC-reserved IPv4 range
        (default false).
    enable_ipv6: program ip6tables too, and accept IPv6 CIDRs in the config (default false).
    random_fully: add ``--random-fully`` to MASQUERADE (when the iptables binary supports it;
        default true).
    to_ports: source-port intervals MASQUERADE maps to; empty (the default) means the kernel's choice.
    """

    masq_chain: str = DEFAULT_MASQ_CHAIN
    nomasq_all_reserved_ranges: bool = False
    enable_ipv6: bool = False
    random_fully: bool = True
    to_ports: tuple[PortRange, ...] = ()

    def __post_init__(self) -> None:
        validate_chain_name(self.masq_chain)


@dataclass(frozen=True, slots=True)
class MasqConfig:
    """The validated contents of the config file.

    non_masquerade_cidrs: destinations that keep the pod source address, in file order
        (default: RFC 1918, plus the reserved ranges with ``--nomasq-all-reserved-ranges``).
    masq_link_local: masquerade 169.254.0.0/16 too (default false: link-local keeps the pod IP).
    masq_link_local_ipv6: masquerade fe80::/10 too (default false).
    resync_interval_ns: how often the kernel is re-checked for drift, in nanoseconds (default 60 s;
        at least :data:`MIN_RESYNC_INTERVAL_NS`).
    cidr_limit: maximum number of ``nonMasqueradeCIDRs`` (link-local not counted; default 64),
        a guard against a runaway list.
    cidr_limit_set: the file sets ``cidrLimit``; only then do plugin contributions count toward
        it (the default 64 is for compatibility, not a limit plugin authors signed up for).
    keys: the canonical keys the file sets (a null value counts only for the CIDR lists,
        where it means an empty list); when several config sources merge, a key no source sets
        keeps its default (see :func:`~masqd.config.merge.merge_configs`).

    The decision model beyond upstream (each optional; with none set the rules are upstream's,
    byte for byte; docs/configuration.md, "Decision model", says how they combine):

    masquerade_cidrs: ``masqueradeCIDRs``, destinations masqueraded even inside a non-masquerade
        range: the longest matching prefix of the two lists decides (default none).
    masquerade_source_cidrs: ``masqueradeSourceCIDRs``; when non-empty only traffic from these
        sources is ever masqueraded (default none: any source).
    non_masquerade_source_cidrs: ``nonMasqueradeSourceCIDRs``, sources never masqueraded
        (default none).
    snat_to_address / snat_to_address_ipv6: ``snatToAddress`` / ``snatToAddressIPv6``, SNAT to
        this address instead of MASQUERADE (it must be assigned to an interface of the agent's
        network namespace when the rules are applied; default none: MASQUERADE).
    output_interfaces: ``outputInterfaces``, only traffic leaving through these interfaces is
        masqueraded; a trailing ``+`` is a prefix wildcard, as in iptables (default none: any).
    """

    non_masquerade_cidrs: tuple[Network, ...] = tuple(parse_cidr(c) for c in RFC1918_CIDRS)
    masq_link_local: bool = False
    masq_link_local_ipv6: bool = False
    resync_interval_ns: int = 60 * _SECOND_NS
    cidr_limit: int = 64
    cidr_limit_set: bool = False
    keys: frozenset[str] = field(default=frozenset(), compare=False)
    masquerade_cidrs: tuple[Network, ...] = ()
    masquerade_source_cidrs: tuple[Network, ...] = ()
    non_masquerade_source_cidrs: tuple[Network, ...] = ()
    snat_to_address: ipaddress.IPv4Address | None = None
    snat_to_address_ipv6: ipaddress.IPv6Address | None = None
    output_interfaces: tuple[str, ...] = ()

    @property
    def resync_interval(self) -> float:
        """``resync_interval_ns`` in seconds."""
        return self.resync_interval_ns / _SECOND_NS


@dataclass(frozen=True, slots=True)
class ParsedConfig:
    """A valid config and the warnings found on the way (unknown keys, duplicates, ...).

    cidr_texts: the texts ``config.non_masquerade_cidrs`` were parsed from, one per network, when
        each is exactly its network's ``str()`` (else empty): a parse of the next version of the
        text takes the networks of the lines that did not change from here (``known`` of
        :func:`~masqd.config.parse.parse_config`) instead of building them again.
    """

    config: MasqConfig
    warnings: tuple[Problem, ...] = field(default=())
    cidr_texts: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def known_networks(self) -> dict[str, Network]:
        """``cidr_texts`` -> their networks, for the ``known`` of the next parse."""
        return dict(zip(self.cidr_texts, self.config.non_masquerade_cidrs))


def default_config(options: AgentOptions) -> MasqConfig:
    """The config used when the file is missing (or a key is absent from it)."""
    cidrs = RFC1918_CIDRS + (RESERVED_CIDRS if options.nomasq_all_reserved_ranges else ())
    return MasqConfig(non_masquerade_cidrs=tuple(parse_cidr(c) for c in cidrs))
