"""The audit record's CIDR changes, as audit hooks and the log line see them.

``AuditEvent.added`` / ``removed`` are documented as read-only mappings of family label to a
tuple of CIDR strings, sorted by address then prefix length. The reconciler hands them over as a
:class:`~masqd.audit.CidrChanges`, whose strings are made only when read (a 100k-CIDR first
apply need not format 100k strings for a hook that never looks): what a reader gets must be
exactly what the eager mapping was.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import anyio
import pytest
import structlog

from masqd.audit import AuditEvent, CidrChanges
from masqd.backends.dryrun import DryRunBackend
from masqd.config import AgentOptions
from masqd.events import Event
from masqd.reconcile import LOGGED_CIDRS, Reconciler


def nets(*texts: str) -> list:
    return [ipaddress.ip_network(t) for t in texts]


def test_changes_read_as_tuples_of_strings():
    changes = CidrChanges({"ipv4": nets("9.0.0.0/8", "10.0.0.0/8"), "ipv6": nets("2001:db8::/32"), "none": []})
    event = AuditEvent(time=0.0, trigger="file", backend="dry-run", result="applied", added=changes)
    assert event.added == {"ipv4": ("9.0.0.0/8", "10.0.0.0/8"), "ipv6": ("2001:db8::/32",)}
    assert list(event.added) == ["ipv4", "ipv6"] and "none" not in event.added and len(event.added) == 2
    assert type(event.added["ipv4"]) is tuple and event.added["ipv4"] is event.added["ipv4"]
    assert dict(event.added.items()) == {"ipv4": ("9.0.0.0/8", "10.0.0.0/8"), "ipv6": ("2001:db8::/32",)}
    assert json.loads(json.dumps(event.as_dict()))["added"] == {"ipv4": ["9.0.0.0/8", "10.0.0.0/8"],
                                                              "ipv6": ["2001:db8::/32"]}
    assert event.removed == {}
    with pytest.raises(TypeError):
        event.added["ipv4"] = ()  # read-only: one hook cannot change what the next one sees
    assert not hasattr(event.added, "networks")  # the view shows the strings only


def test_a_plain_mapping_is_still_copied():
    given = {"ipv4": ["10.0.0.0/8"]}
    event = AuditEvent(time=0.0, trigger="file", backend="dry-run", result="applied", added=given)
    given["ipv4"].append("192.0.2.0/24")
    assert event.added == {"ipv4": ("10.0.0.0/8",)}


def test_a_big_first_apply_is_logged_counted_and_audited_in_full(tmp_path: Path):
    many = [f"10.{i // 256}.{i % 256}.0/24" for i in range(3000)]
    config = tmp_path / "config"
    config.write_text("cidrLimit: 5000\nnonMasqueradeCIDRs:\n" + "".join(f"  - {c}\n" for c in many[::-1] + many[:5]))
    events: list[AuditEvent] = []
    reconciler = Reconciler(DryRunBackend(), AgentOptions(), config, on_audit=events.append)
    with structlog.testing.capture_logs() as logs:
        anyio.run(reconciler.reconcile, (Event("startup"),))
    (line,) = [e for e in logs if e["event"] == "rules applied"]
    in_order = sorted(["169.254.0.0/16", *many], key=lambda t: ipaddress.ip_network(t).network_address)
    assert line["cidrs"] == 3001  # each counted once: link-local and the distinct CIDRs
    assert line["cidrs_added"] == in_order[:LOGGED_CIDRS] and line["cidrs_added_count"] == 3001
    assert line["cidrs_removed"] == [] and "cidrs_removed_count" not in line
    (event,) = events
    assert event.result == "applied" and event.added == {"ipv4": tuple(in_order)} and event.removed == {}


def test_changes_are_the_sorted_set_differences_whatever_the_order_and_repeats():
    """Reference: ipaddress sets and ordering. Lists with repeats, equal networks as distinct
    objects, both families, an empty side, and identical sides."""
    import random

    from masqd.audit import family_changes
    from masqd.ruleset import FamilyRules, Masquerade, RuleSet

    pool = [ipaddress.ip_network(t) for t in (
        "9.0.0.0/8", "10.0.0.0/8", "10.0.0.0/16", "10.0.0.0/24", "0.0.0.0/0", "192.0.2.0/24", "192.0.2.128/25")]
    pool6 = [ipaddress.ip_network(t) for t in ("::/0", "2001:db8::/32", "2001:db8::/48", "fd00::/8", "::a00:0/104")]

    def ruleset(v4, v6):
        return RuleSet("IP-MASQ-AGENT", FamilyRules(4, tuple(v4)), FamilyRules(6, tuple(v6)), Masquerade())

    rng = random.Random(15)
    for _ in range(300):
        old4, new4 = ([ipaddress.ip_network(str(n)) for n in rng.choices(pool, k=rng.randrange(8))] for _ in "ab")
        old6, new6 = (rng.choices(pool6, k=rng.randrange(6)) for _ in "ab")
        added, removed = family_changes(ruleset(old4, old6), ruleset(new4, new6))
        for label, was, now in (("ipv4", old4, new4), ("ipv6", old6, new6)):
            assert added.get(label, ()) == tuple(map(str, sorted(set(now) - set(was)))), (was, now)
            assert removed.get(label, ()) == tuple(map(str, sorted(set(was) - set(now)))), (was, now)
    first = ruleset(pool, pool6)
    added, removed = family_changes(None, first)
    assert added == {"ipv4": tuple(map(str, sorted(pool))), "ipv6": tuple(map(str, sorted(pool6)))} and removed == {}
    assert family_changes(first, first) == ({}, {})
