"""Edits cost O(change) on nftables: set elements changed in place while the kernel monitor vouches
for what the kernel holds, and a full comparison whenever it may not.

The logic runs against :class:`~masqd.testing.fake_nft.FakeNft` (its ``monitor()`` prints each
transaction as ``nft monitor`` does); the netlink encoding and the daemon against the kernel, in
network namespaces of their own.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import anyio
import pytest

from support import write_atomically

from masqd.agent import build_agent
from masqd.backends.nftables import NftablesBackend, desired_state, parse_listing
from masqd.config import AgentOptions, parse_config
from masqd.errors import ElementsRefusedError, ToolTimeoutError
from masqd.ruleset import compute_ruleset
from masqd.testing import netns, running, wait_until
from masqd.testing.fake_nft import FakeNft
from masqd.testing.netns import set_intervals

V6 = AgentOptions(enable_ipv6=True)


def ruleset(cidrs: list[str], options: AgentOptions = V6):
    text = json.dumps({"nonMasqueradeCIDRs": cidrs, "cidrLimit": 100000})
    return compute_ruleset(parse_config(text, options).config, options)


def span(cidr: str) -> tuple[int, int]:
    net = ipaddress.ip_network(cidr)
    return int(net.network_address), int(net.broadcast_address)


BASE = ["10.0.0.0/8", "192.0.2.0/24", "fd00::/8"]


class Listening:
    """A backend on a FakeNft with its monitor running and listening."""

    def __init__(self, tg, nft: FakeNft):
        self.nft, self.backend, self.changes, self.tg = nft, NftablesBackend(nft), [], tg
        self.ready = anyio.Event()

    async def start(self) -> None:
        self.ready = anyio.Event()
        self.tg.start_soon(self._monitor)
        with anyio.fail_after(10):
            await self.ready.wait()

    async def _monitor(self) -> None:
        try:
            await self.backend.monitor(self.changes.append, ready=self.ready.set)
        except Exception:  # the fake monitor stopped, as nft monitor exiting
            pass

    async def edit(self, cidrs: list[str]) -> list:
        """Sync ``cidrs`` and return the executor calls it made."""
        self.nft.calls.clear()
        await self.backend.sync(ruleset(cidrs))
        return list(self.nft.calls)


async def test_while_the_monitor_listens_an_edit_is_only_its_elements_and_a_no_op_only_reads_back():
    async with anyio.create_task_group() as tg:
        on = Listening(tg, FakeNft())
        await on.start()
        assert [kind for kind, _ in await on.edit(BASE)] == ["list", "list", "apply", "list-structure"]
        calls = await on.edit(BASE + ["198.51.100.0/24"])
        assert calls == [("elements", ((4, (), (span("198.51.100.0/24"),)),))]  # nothing read, nothing else
        calls = await on.edit(["10.0.0.0/8", "198.51.100.0/24", "fd00::/8", "2001:db8::/32"])
        assert calls == [("elements", ((4, (span("192.0.2.0/24"),), ()), (6, (), (span("2001:db8::/32"),))))]
        # an unchanged state is compared with what the kernel holds (the resync's check), not written
        assert await on.edit(["10.0.0.0/8", "198.51.100.0/24", "fd00::/8", "2001:db8::/32"]) == [("list", 4), ("list", 6)]
        want = ruleset(["10.0.0.0/8", "198.51.100.0/24", "fd00::/8", "2001:db8::/32"])
        for family in want.families:
            assert parse_listing(on.nft.listing({4: "ip", 6: "ip6"}[family.family]), family.family) == \
                desired_state(family, want.masquerade)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("untrust", [
    pytest.param(lambda on: on.nft.run("add table ip masqd\n"), id="foreign-write"),
    pytest.param(lambda on: on.nft.lose_events(), id="lost-monitor-events"),
])
async def test_after_a_foreign_change_or_lost_events_the_next_edit_compares_whole(untrust):
    async with anyio.create_task_group() as tg:
        on = Listening(tg, FakeNft())
        await on.start()
        await on.edit(BASE)
        untrust(on)
        await wait_until(lambda: on.changes, "the monitor to report it")
        calls = await on.edit(BASE + ["198.51.100.0/24"])
        assert calls[:2] == [("list", 4), ("list", 6)] and calls[2][0] == "elements"
        # compared since: the monitor vouches again
        assert await on.edit(BASE) == [("elements", ((4, (span("198.51.100.0/24"),), ()),))]
        tg.cancel_scope.cancel()


async def test_a_stopped_monitor_means_edits_read_back_until_it_listens_again_and_a_pass_compared():
    async with anyio.create_task_group() as tg:
        on = Listening(tg, FakeNft())
        await on.start()
        await on.edit(BASE)
        on.nft.stop_monitors()
        await wait_until(lambda: not on.backend._listening, "the monitor to stop")
        assert (await on.edit(BASE + ["198.51.100.0/24"]))[:2] == [("list", 4), ("list", 6)]
        await on.start()  # restarted: what was learnt before it listened is compared once more
        assert (await on.edit(BASE))[:2] == [("list", 4), ("list", 6)]
        assert await on.edit(BASE + ["203.0.113.0/24"]) == [("elements", ((4, (), (span("203.0.113.0/24"),)),))]
        tg.cancel_scope.cancel()


async def test_a_refused_element_change_falls_back_to_reading_back_and_replacing_the_table():
    """Another writer deleted the table and the monitor has not said so yet: the in-place change
    is refused by nf_tables (all of it), so the table is read back and written whole."""
    async with anyio.create_task_group() as tg:
        on = Listening(tg, FakeNft())
        await on.start()
        await on.edit(BASE)
        del on.nft.tables[("ip", "masqd")]  # unreported
        calls = await on.edit(BASE + ["198.51.100.0/24"])
        assert [kind for kind, _ in calls] == ["elements", "list", "apply", "list-structure"]
        want = ruleset(BASE + ["198.51.100.0/24"])
        assert parse_listing(on.nft.listing("ip"), 4) == desired_state(want.ipv4, want.masquerade)
        tg.cancel_scope.cancel()


async def test_the_fake_refuses_element_changes_as_nf_tables_does_and_changes_nothing():
    nft = FakeNft()
    await NftablesBackend(nft).sync(ruleset(BASE))
    before = nft.listing("ip"), nft.listing("ip6")
    for changes in ([(4, [span("198.51.100.0/24")], [])],  # not in the set
                    [(4, [], [span("192.0.2.128/25")])],  # overlaps an element
                    [(4, [], [span("203.0.113.0/24")]), (6, [span("2001:db8::/32")], [])]):  # one of two refused
        with pytest.raises(ElementsRefusedError, match="nf_tables refused (removing|adding) 1 intervals (from|to) "
                                                       "set ip6? masqd nonmasq"):
            await nft.change_elements(changes)
        assert (nft.listing("ip"), nft.listing("ip6")) == before


class GatedNft(FakeNft):
    """A FakeNft whose first whole-table write waits for ``gate``: a large apply in progress."""

    def __init__(self):
        super().__init__()
        self.gate = anyio.Event()
        self.applying = anyio.Event()

    async def apply(self, script: str) -> None:
        self.applying.set()
        await self.gate.wait()
        await super().apply(script)


async def test_edits_during_a_large_apply_end_on_the_newest_config(tmp_path: Path):
    config = tmp_path / "config"
    config.write_text(json.dumps({"nonMasqueradeCIDRs": BASE[:2]}))
    nft = GatedNft()
    agent = build_agent(AgentOptions(), backend=NftablesBackend(nft), config=config, drift_check_interval=0)
    async with running(agent, first_pass=False):
        with anyio.fail_after(10):
            await nft.applying.wait()
        for extra in ("198.51.100.0/24", "203.0.113.0/24"):  # two edits while the first apply runs
            write_atomically(config, json.dumps({"nonMasqueradeCIDRs": BASE[:2] + [extra]}))
            await anyio.sleep(0.05)
        nft.gate.set()
        want = ruleset(BASE[:2] + ["203.0.113.0/24"], AgentOptions())
        await wait_until(lambda: nft.listing("ip") and parse_listing(nft.listing("ip"), 4) ==
                         desired_state(want.ipv4, want.masquerade), "the newest config in the kernel")
        await wait_until(lambda: agent.reconciler.status.busy_since is None, "the passes to end")
        assert agent.reconciler.status.applied == want


# --- against the kernel ----------------------------------------------------------------------------------

_SYNCS_IN_NAMESPACE = """
import json, sys, anyio
from masqd.backends.nftables import NftablesBackend, desired_state
from masqd.config import AgentOptions, parse_config
from masqd.ruleset import compute_ruleset

async def main():
    backend = NftablesBackend()
    options = AgentOptions(enable_ipv6=True)
    for cidrs in json.loads(sys.stdin.read()):
        text = json.dumps({"nonMasqueradeCIDRs": cidrs, "cidrLimit": 100000})
        ruleset = compute_ruleset(parse_config(text, options).config, options)
        result = await backend.sync(ruleset)
        again = await backend.sync(ruleset)
        held = {f.family: await backend.current(f.family) == desired_state(f, ruleset.masquerade)
                for f in ruleset.families}
        print(json.dumps({"reasons": result.reasons, "again": again.written, "held": held}), flush=True)

anyio.run(main)
"""

#: Each step's CIDRs; the comment says what the in-place change must get right.
KERNEL_STEPS = [
    # the first write, nft -f: three adjacent /24s are one interval that is no CIDR, written as a
    # /23 and a /24 element
    ["10.0.0.0/8", "192.0.2.0/24", "198.18.0.0/24", "198.18.1.0/24", "198.18.2.0/24", "fd00::/8"],
    ["10.0.0.0/8", "192.0.2.0/24", "198.18.0.0/24", "198.18.2.0/24", "fd00::/8"],  # the middle one removed
    ["10.0.0.0/8", "192.0.2.0/24", "198.18.0.0/24", "198.18.1.0/24", "198.18.2.0/24", "fd00::/8"],  # and back
    ["10.0.0.0/8", "192.0.2.0/24", "fd00::/8"],  # the three removed: their two elements
    ["10.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24", "fd00::/8"],  # one added
    ["10.0.0.0/8", "198.51.100.0/24", "fd00::/8", "2001:db8::/32"],  # removed and added, both families
    ["10.0.0.0/8", "198.51.100.0/24", "198.51.101.0/24", "fd00::/8"],  # adjacent: one wider interval replaces one
    ["0.0.0.0/8", "10.0.0.0/8", "240.0.0.0/4", "::/8", "fd00::/8"],  # the bottom and the top of the address space
    ["10.0.0.0/8", "fd00::/8", "ff00::/8"],  # both removed again; the top of IPv6
    ["10.0.0.0/7", "fd00::/8"],  # a range that contains one held: replaced in one transaction
]


@pytest.mark.netns
def test_in_place_changes_leave_exactly_the_desired_set_in_the_kernel(node_ns):
    result = netns.run(node_ns, sys.executable, "-c", _SYNCS_IN_NAMESPACE, input=json.dumps(KERNEL_STEPS))
    steps = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(steps) == len(KERNEL_STEPS)
    assert steps[0]["reasons"] == ["table ip masqd missing", "table ip6 masqd missing"]
    for step in steps[1:]:  # each an element change, never the fallback that rewrites the table
        assert step["reasons"] and all("intervals removed" in reason for reason in step["reasons"]), step
    for step in steps:
        assert step["again"] == [] and step["held"] == {"4": True, "6": True}, step


_REFUSED_IN_NAMESPACE = """
import anyio, ipaddress
from masqd.backends.nftables import NftSubprocessExecutor
from masqd.errors import ElementsRefusedError

def span(cidr):
    net = ipaddress.ip_network(cidr)
    return int(net.network_address), int(net.broadcast_address)

try:
    anyio.run(NftSubprocessExecutor().change_elements,
              [(4, [], [span("203.0.113.0/24")]), (4, [span("198.51.100.0/24")], [])])
except ElementsRefusedError as exc:
    print(exc)
"""


@pytest.mark.netns
def test_a_refused_element_batch_changes_nothing(node_ns, masqd):
    masqd.ok(node_ns, config="nonMasqueradeCIDRs: [10.0.0.0/8]\n", backend="nftables")
    before = set_intervals(node_ns, 4)
    result = netns.run(node_ns, sys.executable, "-c", _REFUSED_IN_NAMESPACE)
    assert result.stdout == ("nf_tables refused removing 1 intervals from set ip masqd nonmasq4: No such file or "
                             "directory (ENOENT); nothing of the transaction was applied\n")
    assert set_intervals(node_ns, 4) == before  # the valid addition went nowhere either


@pytest.mark.netns
def test_a_daemon_edit_of_a_large_set_is_one_transaction_of_the_changed_elements(node_ns, daemon, monitor, tmp_path):
    cidrs = [f"10.{i // 256}.{i % 256}.0/28" for i in range(0, 4000, 2)]
    d = daemon(json.dumps({"nonMasqueradeCIDRs": cidrs, "cidrLimit": 5000, "resyncInterval": "1h"}),
               backend="nftables")
    if not any("kernel-monitor" in e.get("trigger", "") for e in d.events):  # the pass once it listens
        d.next_event(lambda e: "kernel-monitor" in e.get("trigger", ""))
    monitor.transactions()
    edited = cidrs[1:] + ["192.0.2.0/24"]
    write_atomically(tmp_path / "config", json.dumps({"nonMasqueradeCIDRs": edited, "cidrLimit": 5000,
                                                      "resyncInterval": "1h"}))
    d.next_event(lambda e: e.get("event") == "rules updated")
    (transaction,) = monitor.transactions()
    ours = [line for line in transaction if " masqd " in line]
    assert ours == ["delete element ip masqd nonmasq4 { 10.0.0.0/28 }",
                    "add element ip masqd nonmasq4 { 192.0.2.0/24 }"], transaction
    assert set_intervals(node_ns, 4) == tuple(sorted(span(c) for c in edited + ["169.254.0.0/16"]))


class NoNetlinkNft(FakeNft):
    """A host where nf_tables cannot be reached over netlink by masqd (a sandbox): only nft works."""

    async def change_elements(self, changes) -> None:
        self.calls.append(("elements refused", tuple(changes)))
        raise ElementsRefusedError("adding 1 intervals to set ip masqd nonmasq4", "Operation not permitted (EPERM)")


async def test_without_netlink_the_monitor_still_listens_and_edits_are_written_with_nft():
    async with anyio.create_task_group() as tg:
        on = Listening(tg, NoNetlinkNft())
        await on.start()  # proven by a marked nft -f transaction instead
        await on.edit(BASE)
        calls = await on.edit(BASE + ["198.51.100.0/24"])
        assert [kind for kind, _ in calls] == ["elements refused", "list", "apply", "list-structure"]
        want = ruleset(BASE + ["198.51.100.0/24"])
        assert parse_listing(on.nft.listing("ip"), 4) == desired_state(want.ipv4, want.masquerade)
        tg.cancel_scope.cancel()


async def test_an_element_change_that_timed_out_is_read_back_next_time_not_believed():
    """The batch went in but its acknowledgement never came (masqd gave up at the deadline): what
    the kernel holds is unknown, so the next pass reads back instead of editing from the state
    before (issue 19: a timed-out tool never leaves masqd believing what it has not read)."""

    class AckLost(FakeNft):
        lost = False  # from the next change on

        async def change_elements(self, changes) -> None:
            await super().change_elements(changes)
            if self.lost:
                self.lost = False
                raise ToolTimeoutError(["nf_tables", "netlink", "batch:"], 30.0, wrote=True)

    async with anyio.create_task_group() as tg:
        on = Listening(tg, AckLost())
        await on.start()
        await on.edit(BASE)
        on.nft.lost = True
        with pytest.raises(ToolTimeoutError):
            await on.edit(BASE + ["198.51.100.0/24"])
        assert await on.edit(BASE + ["198.51.100.0/24"]) == [("list", 4), ("list", 6)]  # in place: nothing written
        tg.cancel_scope.cancel()


async def test_an_edit_works_out_what_the_kernel_held_only_when_asked(monkeypatch):
    """What the kernel held (SyncResult.held) is for a first write's log line; working it out from
    the set's intervals is O(CIDRs) (0.3 s at 100k), so an edit does not pay it before writing."""
    import masqd.backends.nftables.backend as backend_module

    calls = []
    real = backend_module.range_networks
    monkeypatch.setattr(backend_module, "range_networks", lambda *args: calls.append(args) or real(*args))
    async with anyio.create_task_group() as tg:
        on = Listening(tg, FakeNft())
        await on.start()
        await on.backend.sync(ruleset(BASE))
        result = await on.backend.sync(ruleset(BASE + ["198.51.100.0/24"]))
        assert result.written == ("ipv4",) and calls == []
        assert [str(net) for net in result.held["ipv4"]] == ["10.0.0.0/8", "169.254.0.0/16", "192.0.2.0/24"]
        assert len(calls) == 1
        tg.cancel_scope.cancel()
