"""The real daemon's endpoint in a network namespace, as a node's kubelet and Prometheus see it
(issue 17, sections 5 and 6): ``masqd run`` on the nftables backend in a fresh namespace, its
endpoint on the namespace's ``127.0.0.1:9142`` (the default ``:9142``), read from inside it.

- every counter series a pass can touch is there at 0 before it happens, so the first
  ``file`` pass shows as an increase from 0 to 1, and the conntrack and shadowing series exist
  from the start;
- twenty idle connections held from the probes' own address do not fail ``/healthz`` or
  ``/readyz`` from that address.
"""

from __future__ import annotations

import json
import sys

import pytest

from masqd_proc import MASQD, DaemonProcess

from masqd.testing import netns

pytestmark = pytest.mark.netns

_CLIENT = r"""
import json, socket, sys, urllib.error, urllib.request
held = [socket.create_connection(("127.0.0.1", 9142), timeout=5) for _ in range(int(sys.argv[1]))]
def get(path):
    try:
        answer = urllib.request.urlopen("http://127.0.0.1:9142" + path, timeout=5)
        return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
print(json.dumps({path: get(path) for path in ("/healthz", "/readyz", "/metrics")}))
"""


def _scrape(ns: str, idle: int = 0) -> dict[str, tuple[int, str]]:
    """``/healthz``, ``/readyz`` and ``/metrics`` read inside ``ns`` while ``idle`` other
    connections from the same address are held open."""
    return json.loads(netns.run(ns, sys.executable, "-c", _CLIENT, str(idle)).stdout)


def _sample(metrics: str, line_start: str) -> float:
    [line] = [line for line in metrics.splitlines() if line.startswith(line_start + " ")]
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture
def running(node_ns, tmp_path):
    config = tmp_path / "config"
    config.write_text("resyncInterval: 1h\nnonMasqueradeCIDRs: [10.0.0.0/8]\n")
    daemon = DaemonProcess(node_ns, config, "--enable-ipv6", backend="nftables")
    try:
        daemon.next_event(lambda e: e.get("event") == "rules applied")
        yield daemon, config
    finally:
        daemon.kill()
        netns.run(node_ns, str(MASQD), "cleanup", "--backend", "nftables", "--enable-ipv6", check=False)


def test_every_series_is_there_at_zero_and_the_first_file_pass_counts_from_it(node_ns, running):
    daemon, config = running
    metrics = _scrape(node_ns)["/metrics"][1]
    assert _sample(metrics, 'masqd_reconciles_total{result="applied",trigger="startup"}') == 1
    for series in ('masqd_reconciles_total{result="applied",trigger="file"}',
                   'masqd_reconciles_total{result="rejected",trigger="file"}',
                   'masqd_conntrack_deleted_total{family="ipv4",protocol="udp"}',
                   'masqd_conntrack_deleted_total{family="ipv6",protocol="udp"}',
                   "masqd_conntrack_errors_total", 'masqd_shadowing_rules{family="ipv4"}',
                   'masqd_shadowing_rules{family="ipv6"}'):
        assert _sample(metrics, series) == 0, series
    staged = config.with_name("staged")
    staged.write_text("resyncInterval: 1h\nnonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n")
    staged.replace(config)
    daemon.next_event(lambda e: e.get("event") == "rules updated")
    metrics = _scrape(node_ns)["/metrics"][1]
    assert _sample(metrics, 'masqd_reconciles_total{result="applied",trigger="file"}') == 1


def test_idle_connections_from_the_probes_address_never_fail_the_probes(node_ns, running):
    answers = _scrape(node_ns, idle=20)  # more than the 16 one address may hold at once
    assert answers["/healthz"][0] == 200, answers["/healthz"]
    assert answers["/readyz"][0] == 200, answers["/readyz"]
    assert answers["/metrics"][0] == 200
