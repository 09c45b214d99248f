"""Hostile config input, shared by the fuzz tests of the config file (``test_config_fuzz.py``)
and of the API objects (``test_api_fuzz.py``): hypothesis strategies for config documents, and
the checks every outcome must pass (a rule text made only of fixed skeletons and real networks,
an error whose every message is printable).
"""

from __future__ import annotations

import ipaddress
import json
import re

import yaml
from hypothesis import strategies as st

from masqd.cidrs import CIDRError, parse_cidr
from masqd.config import AgentOptions
from masqd.errors import ConfigError

V4 = AgentOptions()
V6 = AgentOptions(enable_ipv6=True)
#: A single example taking longer than this is a hang (not a performance bound: any example
#: normally takes milliseconds, and a loaded CI machine must not make the test flaky).
HANG_SECONDS = 30

# --- what every outcome must satisfy ---------------------------------------------------------------

#: Every character a rendered iptables-restore text may hold.
SAFE_RULE_CHARS = re.compile(r'[A-Za-z0-9 \-:/.\[\]#*"()!,\n]*')
#: A rule's destination, as ``iptables-save`` prints it.
DEST_MATCH = re.compile(r" -d (\S+)")


def rule_skeleton(text: str) -> list[str]:
    """Each line of a rule text with its destination, if any, replaced by ``<net>``."""
    return [DEST_MATCH.sub(" -d <net>", line) for line in text.splitlines()]


def strings_in(value: object) -> list[str]:
    """Every string in a loaded document (keys too)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings_in(k) + strings_in(v)]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return []


def is_cidr(text: str) -> bool:
    """Whether masqd's parser takes ``text`` as a CIDR."""
    try:
        parse_cidr(text)
    except CIDRError:
        return False
    return True


def assert_clear_error(exc: ConfigError) -> None:
    """The error names at least one problem, and says everything in printable text."""
    assert exc.problems, "an error names at least one problem"
    for finding in exc.problems + exc.warnings:
        assert str(finding).isprintable(), finding
    message = str(exc)
    assert message.isprintable() and len(message) < 100_000


# --- strategies ------------------------------------------------------------------------------------

#: Strings that would do harm if they ever reached a rule text.
INJECTIONS = (
    "10.0.0.0/8\n-A POSTROUTING -j ACCEPT", "10.0.0.0/8 -j ACCEPT", '10.0.0.0/8" -j ACCEPT #',
    "10.0.0.0/8\x00-j ACCEPT", "10.0.0.0/8; flush ruleset", "$(reboot)10.0.0.0/8", "192.0.2.0/24\r\nCOMMIT",
    "ｆｄ００::/8", "10.0.0.0/8\ud800", "::ffff:10.0.0.0/104", "10.0.0.0/08", "1.2.3.4/33", "fe80::%eth0/64",
)
texts = st.text(max_size=30) | st.sampled_from(INJECTIONS) | st.text(st.characters(codec="utf-8", categories=["Cc", "Cs", "Zs", "Zl", "Co"]), max_size=10)
scalars = st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63 - 2, max_value=2**70) | st.floats() | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
                           max_leaves=25)


@st.composite
def networks(draw) -> str:
    version = draw(st.sampled_from((4, 6)))
    address = draw(st.ip_addresses(v=version))
    prefix = draw(st.integers(0, 32 if version == 4 else 128))
    return str(ipaddress.ip_network((address, prefix), strict=False))


cidr_items = networks() | st.sampled_from(("10.0.0.1/8", "10.0.0.0/8", "fd00::/8", "fe80::/10")) | scalars
#: Config documents: the known keys with good, bad and odd values, and unknown keys.
documents = st.fixed_dictionaries({}, optional={
    "nonMasqueradeCIDRs": st.lists(cidr_items, max_size=12) | json_values,
    "masqLinkLocal": st.booleans() | json_values,
    "masqLinkLocalIPv6": st.booleans() | json_values,
    "resyncInterval": st.sampled_from(("60s", "1m30s", "500ms", "1ns", "0", "-1s", "9999999999h", "1x")) | json_values,
    "cidrLimit": st.integers(-2, 2**64) | json_values,
    "nonmasqueradecidrs": st.lists(cidr_items, max_size=3),
}).flatmap(lambda known: st.dictionaries(texts, json_values, max_size=3).map(lambda extra: {**extra, **known}))


def dump_document(document: object, style: str) -> str:
    """``document`` as text: ``json``, ``json-ascii``, ``yaml``, ``yaml-unicode`` or ``yaml-flow``."""
    if style == "json":
        return json.dumps(document, ensure_ascii=False)
    if style == "json-ascii":
        return json.dumps(document)
    return yaml.safe_dump(document, allow_unicode=style == "yaml-unicode", default_flow_style=style == "yaml-flow")
