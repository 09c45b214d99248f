"""CIDR parsing and the bulk helpers of ``masqd.cidrs``.

Plugins and backends receive the networks masqd parses and treat them as ``ipaddress`` networks:
the fast construction must make networks no one can tell from the ones ``ipaddress`` makes, and
the int keys, the text and the duplicate detection must say exactly what the networks' own
equality, ordering and ``str`` say.
"""

from __future__ import annotations

import copy
import ipaddress
import itertools
import pickle
import random

import pytest

from masqd import cidrs
from masqd.cidrs import CIDRError, cidr_text, duplicates, network_key, parse_cidr, parse_cidrs, split_families, unique


def _v4_samples() -> list[str]:
    rng = random.Random(4)
    samples = ["0.0.0.0/0", "10.0.0.0/8", "255.255.255.252/30", "192.0.2.0/24", "1.2.3.4/32", "1.2.3.4/31"]
    for length in range(33):
        for _ in range(20):
            ip = rng.getrandbits(32) & ~((1 << (32 - length)) - 1)
            samples.append(f"{ipaddress.IPv4Address(ip)}/{length}")
    return samples


V4_SAMPLES = _v4_samples()
V6_SAMPLES = ["::/0", "fd00::/8", "fe80::/10", "2001:db8::/32", "::ffff:10.0.0.0/104", "::a00:0/104", "::1/128"]


def test_the_fast_construction_is_in_use_on_this_python():
    assert cidrs._fast_paths_agree()
    assert cidrs._v4_network is cidrs._v4_network_direct


@pytest.mark.parametrize("length", range(33))
def test_parsed_networks_cannot_be_told_from_ipaddress_ones(length):
    for text in V4_SAMPLES:
        if text.endswith(f"/{length}"):
            _assert_indistinguishable(parse_cidr(text), ipaddress.ip_network(text))


def _assert_indistinguishable(made, expected):
    assert type(made) is type(expected) and vars(made).keys() == vars(expected).keys()
    assert made == expected and hash(made) == hash(expected) and (made != expected) is False
    assert (str(made), repr(made), made.with_netmask, made.num_addresses) == (
        str(expected), repr(expected), expected.with_netmask, expected.num_addresses)
    assert made.network_address == expected.network_address and made.netmask == expected.netmask
    assert made.broadcast_address == expected.broadcast_address and made.hostmask == expected.hostmask
    assert list(itertools.islice(made.hosts(), 3)) == list(itertools.islice(expected.hosts(), 3))
    assert pickle.loads(pickle.dumps(made)) == expected and copy.deepcopy(made) == expected
    assert made.subnet_of(expected) and expected.supernet_of(made) and made.overlaps(expected)
    assert {made: 1}[expected] == 1 and expected in {made} and sorted([expected, made]) == [made, made]


def test_parse_cidrs_is_parse_cidr_for_each_value_with_errors_in_place():
    values = [*V4_SAMPLES[:50], *V6_SAMPLES, "10.0.0.1/8", "10.0.0.0/08", "1.2.3.4/33", "10.0.0.00/8", "", None, 8,
              "10.0.0.0/8 ", "１.0.0.0/8", "10.0.0.0/²", "10.0.0.0/8\x00", "10.0.0.0/-8", "10.0.0.0/+8", "10.0.0.0/0x8"]
    results, canonical = parse_cidrs(values)
    assert not canonical
    for value, result in zip(values, results, strict=True):
        try:
            expected = parse_cidr(value)
        except CIDRError as exc:
            assert isinstance(result, CIDRError) and result.reason == exc.reason and result.value == value
        else:
            assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(("values", "canonical"), [
    pytest.param(["10.0.0.0/8", "0.0.0.0/0", "192.0.2.4/30"], True, id="ipv4-as-str-writes-it"),
    pytest.param([], True, id="empty"),
    pytest.param(["10.0.0.0/8", "10.0.0.0/08"], False, id="prefix-leading-zero"),
    pytest.param(["10.0.0.0/8", "0.0.0.0/00"], False, id="zero-prefix-written-twice"),
    pytest.param(["10.0.0.0/8", "fd00::/8"], False, id="ipv6"),
    pytest.param(["10.0.0.1/32"], False, id="host-route-made-by-the-constructor"),
    pytest.param(["10.0.0.1/8"], False, id="an-error"),
])
def test_parse_cidrs_says_when_distinct_texts_mean_distinct_networks(values, canonical):
    results, flag = parse_cidrs(values)
    assert flag is canonical
    if flag:
        assert [str(net) for net in results] == values


def test_network_key_is_equality_and_orders_by_address_then_prefix():
    nets = [ipaddress.ip_network(t) for t in V4_SAMPLES + V6_SAMPLES + ["::/0", "0.0.0.0/0", "::/32", "0.0.0.0/32"]]
    for a in nets:
        for b in random.Random(6).sample(nets, 40) + [a]:
            assert (network_key(a) == network_key(b)) == (a == b), (a, b)
    for family in split_families(nets):
        assert sorted(family, key=network_key) == sorted(family, key=lambda n: (n.network_address, n.prefixlen))


def test_cidr_text_is_str():
    for text in V4_SAMPLES + V6_SAMPLES:
        net = ipaddress.ip_network(text)
        assert cidr_text(net) == str(net)


def test_duplicates_and_unique_follow_network_equality():
    a, b, c = parse_cidr("10.0.0.0/8"), parse_cidr("0.0.0.0/0"), parse_cidr("::/0")  # b and c: same int, prefix
    listed = [a, b, c, parse_cidr("10.0.0.0/08"), c, a, ipaddress.ip_network("10.0.0.0/8")]
    assert duplicates(listed) == [a, c]  # each once, in order of first repeat
    assert duplicates(listed)[0] is listed[3]  # the repeating entry itself, as a set of networks gave
    assert list(unique(listed).values()) == [a, b, c] and unique(listed)[network_key(a)] is a
    assert duplicates([b, c]) == []


def test_split_families_keeps_order():
    nets = [parse_cidr(t) for t in ("10.0.0.0/8", "fd00::/8", "192.0.2.0/24", "::/0")]
    assert split_families(nets) == ((nets[0], nets[2]), (nets[1], nets[3]))
    assert split_families(iter(nets[::2])) == ((nets[0], nets[2]), ())


def test_bulk_parsing_leaves_the_garbage_collector_as_it_was():
    import gc

    values = ["10.0.0.0/8", "10.0.0.1/8", None] * 1000
    results, _ = parse_cidrs(values)
    assert gc.isenabled() and isinstance(results[1], CIDRError) and results[1].__traceback__ is None
    gc.disable()
    try:
        parse_cidrs(values)
        assert not gc.isenabled()  # paused by someone else: left paused
    finally:
        gc.enable()
