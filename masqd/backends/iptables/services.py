"""kube-proxy's Services from its iptables-mode rules in the nat table (``KUBE-SERVICES``,
``KUBE-NODEPORTS``, ``KUBE-EXT-*`` / ``KUBE-SVC-*`` / ``KUBE-SVL-*`` / ``KUBE-FW-*``,
``KUBE-SEP-*``, ``KUBE-MARK-MASQ``, ``KUBE-POSTROUTING``), as ``iptables-save`` prints them, into
a :class:`~masqd.backends.services.ServiceMap`. Pure: no I/O (the backend reads the text).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from masqd.backends.services import (CLUSTER_IP, DEFAULT_MARK, EXTERNAL_IP, LOAD_BALANCER_IP, NODE_PORT,
                                     ServiceEndpoint, ServiceFrontend, ServiceMap, endpoint)
from masqd.cidrs import Network

SERVICES, NODEPORTS, MARK_MASQ, POSTROUTING = "KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"
#: Matches a frontend's own rules carry (they select the frontend, they do not narrow its traffic).
_FRONTEND_MATCHES = frozenset({"tcp", "udp", "sctp", "comment", "statistic"})
_KINDS = ((" cluster IP", CLUSTER_IP), (" external IP", EXTERNAL_IP), (" loadbalancer IP", LOAD_BALANCER_IP))


@dataclass
class _Rule:
    """One ``-A`` line: the options this reader looks at; ``other``: it has matches it does not."""

    destination: Network | None = None
    source: Network | None = None
    source_negated: bool = False
    protocol: str | None = None
    dport: int | None = None
    comment: str = ""
    local_destination: bool = False
    target: str | None = None
    target_args: list[str] = field(default_factory=list)
    other: bool = False


def _rule(line: str) -> _Rule:
    rule = _Rule()
    try:
        tokens = shlex.split(line)[2:]  # after -A CHAIN
    except ValueError:
        rule.other = True
        return rule
    negate, index = False, 0
    while index < len(tokens):
        token, value = tokens[index], tokens[index + 1] if index + 1 < len(tokens) else ""
        index += 2
        if token == "!":
            negate, index = True, index - 1
            continue
        if token in ("-j", "-g"):
            rule.target, rule.target_args = value, tokens[index:]
            break
        if token in ("-d", "-s"):
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                rule.other = True
            else:
                if token == "-d" and not negate:
                    rule.destination = net
                elif token == "-s":
                    rule.source, rule.source_negated = net, negate
                else:
                    rule.other = True
        elif token == "-p" and not negate:
            rule.protocol = value
        elif token == "--dport" and not negate and value.isdigit():
            rule.dport = int(value)
        elif token == "--comment":
            rule.comment = value
        elif token == "-m":
            if value == "addrtype" and tokens[index:index + 2] == ["--dst-type", "LOCAL"]:
                rule.local_destination, index = True, index + 2
            elif value not in _FRONTEND_MATCHES:
                rule.other = True
        elif token in ("--mode", "--probability"):
            pass  # -m statistic: which endpoint, not whether
        else:
            rule.other = True
            index -= 1  # an option whose arguments are not known: read on token by token
        negate = False
    return rule


def parse_services(chains: Mapping[str, tuple[str, ...]], family: int) -> ServiceMap:
    """kube-proxy's Services in the nat chains of one family (:func:`.render.parse_nat_chains`);
    an empty map when ``KUBE-SERVICES`` is not there. NodePorts on every local address
    (``-m addrtype --dst-type LOCAL``) set ``nodeports_local``; the backend fills in the addresses."""
    if SERVICES not in chains:
        return ServiceMap()
    frontends: list[ServiceFrontend] = []
    nodeport_addresses, local = [], False
    # older kube-proxy marks in KUBE-SERVICES itself, ahead of the frontend's jump to its chain
    marking = [r for r in map(_rule, chains[SERVICES]) if r.target == MARK_MASQ and r.source_negated]
    for line in chains[SERVICES]:
        rule = _rule(line)
        if rule.target == MARK_MASQ:
            continue
        if rule.target == NODEPORTS:
            local |= rule.local_destination
            if rule.destination is not None and rule.destination.num_addresses == 1:
                nodeport_addresses.append(rule.destination.network_address)
            continue
        if rule.target is None or rule.target not in chains or rule.destination is None or rule.dport is None:
            continue
        label, kind = _label(rule.comment, rule.target)
        frontend = _frontend(chains, family, label, kind, rule, rule.destination.network_address)
        ahead = tuple(r.source for r in marking if (r.destination, r.protocol, r.dport)
                      == (rule.destination, rule.protocol, rule.dport) and not r.other)
        if ahead:
            frontend = replace(frontend, marks_unless_from=tuple(dict.fromkeys((*frontend.marks_unless_from, *ahead))))
        frontends.append(frontend)
    for line in chains.get(NODEPORTS, ()):
        rule = _rule(line)
        if rule.target in chains and rule.dport is not None and rule.target != MARK_MASQ:
            frontends.append(_frontend(chains, family, rule.comment, NODE_PORT, rule, None))
    return ServiceMap(f"iptables chain {SERVICES}", tuple(frontends), tuple(nodeport_addresses), local,
                      _mark(chains), _masquerades_marked(chains), POSTROUTING)


def _label(comment: str, target: str) -> tuple[str, str]:
    for suffix, kind in _KINDS:
        if comment.endswith(suffix):
            return comment[:-len(suffix)], kind
    return comment, CLUSTER_IP if target.startswith("KUBE-SVC-") else EXTERNAL_IP


def _frontend(chains, family: int, label: str, kind: str, rule: _Rule, address) -> ServiceFrontend:
    """The frontend ``rule`` sends to its chain: the endpoints of every ``KUBE-SEP-*`` reachable
    from there, and the ``KUBE-MARK-MASQ`` jumps on the way (unconditional: all traffic;
    ``! -s CIDR``: traffic from outside it; ``-s ENDPOINT``, the hairpin, and conditional ones
    are left out)."""
    endpoints: dict[ServiceEndpoint, None] = {}
    marks_all, marks_unless = False, []
    if kind == NODE_PORT:  # older kube-proxy marks NodePort traffic in KUBE-NODEPORTS itself
        marks_all = any(r.target == MARK_MASQ and r.dport == rule.dport and r.protocol == rule.protocol
                        and r.source is None and not r.other for r in map(_rule, chains.get(NODEPORTS, ())))
    pending, seen = [rule.target], set()
    while pending:
        chain = pending.pop(0)
        if chain in seen:
            continue
        seen.add(chain)
        for inner in map(_rule, chains.get(chain, ())):
            if inner.target == MARK_MASQ and not inner.other:
                if inner.source is None:
                    marks_all = True
                elif inner.source_negated:
                    marks_unless.append(inner.source)
            elif inner.target == "DNAT":
                found = _dnat(inner.target_args, family, chain)
                if found is not None:
                    endpoints[found] = None
            elif inner.target in chains and inner.target.startswith("KUBE-") and inner.target != MARK_MASQ:
                pending.append(inner.target)
    return ServiceFrontend(label, kind, rule.protocol or "", rule.dport, rule.target, address, tuple(endpoints),
                           marks_all, tuple(dict.fromkeys(marks_unless)))


def _dnat(args: list[str], family: int, chain: str) -> ServiceEndpoint | None:
    if "--to-destination" not in args:
        return None
    index = args.index("--to-destination")
    return endpoint(args[index + 1], family, chain) if index + 1 < len(args) else None


def _mark(chains) -> int:
    for line in chains.get(MARK_MASQ, ()):
        found = re.search(r"--(?:set-xmark|or-mark|set-mark) (0x[0-9a-fA-F]+)", line)
        if found:
            return int(found[1], 16)
    return DEFAULT_MARK


def _masquerades_marked(chains) -> bool:
    hooked = any(_rule(line).target == POSTROUTING for line in chains.get("POSTROUTING", ()))
    return hooked and any(_rule(line).target in ("MASQUERADE", "SNAT") for line in chains.get(POSTROUTING, ()))
