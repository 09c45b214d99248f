#!/usr/bin/env python3
"""Kubernetes latency: time from an API object change to the new rule in the kernel.

Runs ``masqd run --kube-configmap kube-system/ip-masq-agent --egress-nat-policies`` inside a
fresh network namespace (needs root), against the in-process fake API server of the tests
(``tests/kubeapi.py``, loaded from there by its path: the real list/watch protocol over a real
socket, listening inside that namespace). Two series, each change adding one CIDR:

- ConfigMap: replace the ConfigMap's ``config`` key on the server;
- policy: replace an ``EgressNATPolicy``'s destinations on the server.

Each latency runs from the write on the server to the moment the kernel announces the new rule
through ``nft monitor`` (iptables here is the nf_tables variant, so every rule written is
announced): server write -> watch event -> reconcile -> iptables-restore -> kernel.

    sudo .venv/bin/python benchmarks/kube_latency.py [--changes 30] [--backend iptables]

Prints each latency, median / p95 / max per series, and the ratio to the upstream agent, which
sees a ConfigMap edit only after the kubelet re-projects the volume (its sync period, 60 s by
default, plus the ConfigMap cache TTL) and then its own next resync (60 s): about a minute on
average, counted here as 30 s + 30 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import namespaces_usable, nft_monitor, percentiles, stop_process, wait_for_line

from masqd.testing import netns

#: The tests' fake API server.
KUBEAPI = Path(__file__).resolve().parent.parent / "tests" / "kubeapi.py"

#: Upstream: kubelet volume refresh (~60 s sync period, 30 s on average) + its own resync (30 s avg).
UPSTREAM_AVERAGE_S = 60.0


def configmap(cidr: str) -> dict:
    text = f"resyncInterval: 1h\nnonMasqueradeCIDRs: [10.0.0.0/8, {cidr}]\n"
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "ip-masq-agent", "namespace": "kube-system"}, "data": {"config": text}}


def policy(cidr: str) -> dict:
    return {"apiVersion": "networking.gke.io/v1", "kind": "EgressNATPolicy", "metadata": {"name": "bench"},
            "spec": {"action": "NoSNAT", "destinations": [{"cidr": cidr}]}}


def rule_text(backend: str, cidr: str) -> str:
    """How ``nft monitor`` announces the element or rule for ``cidr``."""
    return f"ip daddr {cidr}" if backend == "iptables" else cidr


def fake_kube_api(**settings):
    """A ``FakeKubeAPI`` (see ``tests/kubeapi.py``), not started."""
    spec = importlib.util.spec_from_file_location("kubeapi", KUBEAPI)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while a class is made
    spec.loader.exec_module(module)
    return module.FakeKubeAPI(**settings)


def series(api, lines, make, cidrs: list[str], backend: str, label: str) -> list[float]:
    latencies = []
    for i, cidr in enumerate(cidrs):
        start = time.perf_counter()
        api.put(make(cidr))
        seen = wait_for_line(lines, rule_text(backend, cidr))
        latencies.append((seen - start) * 1000)
        print(f"{label} change {i + 1:2d}: {latencies[-1]:7.2f} ms")
        time.sleep(0.05)  # let the rest of that write land before the next change
        while not lines.empty():
            lines.get_nowait()
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--backend", choices=("iptables", "nftables"), default="iptables")
    args = parser.parse_args()
    if not namespaces_usable():
        return 2
    masqd = Path(sys.executable).with_name("masqd")
    workdir = Path(tempfile.mkdtemp(prefix="masqd-bench-"))
    procs: list[subprocess.Popen] = []
    with netns.namespace("bench") as ns:
        api = fake_kube_api(sock=netns.listening_socket_in(ns), bookmark_interval=None)
        try:
            api.start()
            kubeconfig = api.write_kubeconfig(workdir / "kubeconfig")
            api.put(configmap("192.0.2.0/24"))
            monitor, lines = nft_monitor(ns)
            procs.append(monitor)
            daemon = netns.popen(ns, str(masqd), "run", "--backend", args.backend, "--config", str(workdir / "absent"),
                                 "--kube-configmap", "kube-system/ip-masq-agent", "--egress-nat-policies",
                                 "--kubeconfig", str(kubeconfig), "--log-format", "json", stderr=subprocess.DEVNULL)
            procs.append(daemon)
            wait_for_line(lines, rule_text(args.backend, "192.0.2.0/24"))
            time.sleep(0.2)
            # config only, no traffic is sent to these ranges (outside 10.0.0.0/8, which nftables
            # would merge them into)
            configmap_ms = series(api, lines, configmap,
                                  [f"100.{64 + i // 256}.{i % 256}.0/24" for i in range(args.changes)],
                                  args.backend, "configmap")
            policy_ms = series(api, lines, policy, [f"198.{18 + i // 256}.{i % 256}.0/24" for i in range(args.changes)],
                               args.backend, "policy")
        finally:
            for proc in reversed(procs):
                stop_process(proc)
            api.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"backend {args.backend}, {args.changes} changes per series; API object write -> rule in the kernel")
    for label, values in (("ConfigMap", configmap_ms), ("EgressNATPolicy", policy_ms)):
        median, p95, worst = percentiles(values)
        print(f"{label:16s} median {median:7.2f} ms   p95 {p95:7.2f} ms   max {worst:7.2f} ms   "
              f"(upstream ~{UPSTREAM_AVERAGE_S:.0f} s on average: {UPSTREAM_AVERAGE_S * 1000 / median:,.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
