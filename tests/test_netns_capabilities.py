"""The image's capability model, proven against the real kernel in throw-away namespaces.

The image runs masqd as a non-root user with no capabilities; the iptables and nft binaries carry
file capabilities. Kubernetes gives a non-root container no ambient capabilities, so this is the
only way the pod's ``capabilities.add`` reaches iptables. Each test here rebuilds that situation:

- copies of this machine's iptables/nft binaries (the same Debian release as the image's base)
  get exactly the file capabilities the Dockerfile's ``setcap`` gives, read from the Dockerfile;
- ``masqd run --once`` runs inside a namespace of the test's own under ``setpriv`` as the
  Dockerfile's ``USER``, with the bounding set a pod adding NET_ADMIN and NET_RAW (and dropping
  ALL) has, no inheritable or ambient capabilities, and PATH leading to the copies;
- the rules are then read back, as root, inside that namespace.

With the capabilities the rules land; without them, under ``no_new_privs`` (what
``allowPrivilegeEscalation: false`` sets) or with NET_RAW missing from the bounding set, masqd
fails with exit 3 and the kernel's refusal, and nothing is written. The systemd unit's model
(ambient capabilities, no file capabilities) and the legacy-iptables findings behind the README's
advice (the xtables lock, ``/proc/net/ip_tables_names``) are checked the same way.

The interpreter and masqd must be readable by the unprivileged user: a directory on their path
that others cannot enter (``/root`` holding a pyenv, say) is overlaid, in the namespace's private
mount namespace only, by an overlay with ``o+x`` added. Nothing outside the test's namespace and
temporary directory is changed, and both are removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import masqd
from masqd.testing import netns
from masqd_proc import log_events
from deploy_files import (EXAMPLES, image_capabilities, image_user, masqd_tools, setcap_grants, unit,
                          unit_capabilities, unit_exec_start)

pytestmark = pytest.mark.netns

MASQD = Path(sys.executable).parent / "masqd"
CHAIN = "IP-MASQ-AGENT"
KEEP = 'ip-masq-agent: local traffic is not subject to MASQUERADE'
CONFIG = "nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\n"
EXIT_BACKEND = 3


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"{name} is not installed (setcap/getcap: apt-get install libcap2-bin; setpriv: util-linux)")
    return path


# --- the unprivileged process ------------------------------------------------------------------


def _untraversable(paths: list[Path]) -> list[Path]:
    """Directories on the way to ``paths`` that a user who is neither their owner nor in their
    group cannot enter (no ``o+x``), outermost first."""
    found: list[Path] = []
    for path in paths:
        for parent in reversed(Path(os.path.realpath(path)).parents):
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH and parent not in found:
                found.append(parent)
    return sorted(found, key=lambda p: len(p.parts))


@dataclass
class Sandbox:
    """A temporary directory (mode 0755) with ``bin/`` (copies of the image's capped binaries and
    a symlink for every command masqd runs), ``nocaps/`` (the same without capabilities), the
    config file, and what :meth:`run` needs to start a process as an unprivileged user."""

    root: Path
    ns: str
    uid: int
    gid: int
    caps: frozenset[str]
    overlays: list[Path] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.root / "ip-masq-agent"

    def run(self, *argv: str, bin_dir: str = "bin", uid: int | None = None, bounding: frozenset[str] | None = None,
            ambient: frozenset[str] = frozenset(), no_new_privs: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace as ``uid`` (default: the image's user) with the bounding
        set ``bounding`` (default: the image's capabilities, i.e. the pod's ``add`` list) and no
        inheritable capabilities unless ``ambient`` asks for ambient ones."""
        uid = self.uid if uid is None else uid
        bounding = self.caps if bounding is None else bounding
        setpriv = [_tool("setpriv")]
        if uid != 0:
            setpriv += [f"--reuid={uid}", f"--regid={self.gid}", "--clear-groups"]
        setpriv += [f"--bounding-set=-all{_setpriv_caps(bounding)}", f"--inh-caps=-all{_setpriv_caps(ambient)}"]
        if ambient:
            setpriv.append(f"--ambient-caps=-all{_setpriv_caps(ambient)}")
        if no_new_privs:
            setpriv.append("--no-new-privs")
        # Only the chosen binaries: /usr/sbin is not on PATH, so nothing falls back to an uncapped one.
        environment = {"PATH": f"{self.root / bin_dir}:/usr/bin:/bin", "HOME": str(self.root), "LC_ALL": "C",
                       "MASQD_PLUGINS": "", **(env or {})}
        script = ["set -e"]
        if uid != 0:
            mount, chmod = _tool("mount"), _tool("chmod")
            for i, directory in enumerate(self.overlays):
                upper, work = self.root / f"overlay{i}" / "upper", self.root / f"overlay{i}" / "work"
                script.append(f"{mount} -t overlay overlay -o lowerdir={directory},upperdir={upper},workdir={work} "
                              f"{directory}")
                script.append(f"{chmod} o+x {directory}")
        script.append('exec "$@"')
        # `ip netns exec` runs the command in a private mount namespace: the overlays vanish with it.
        command = [_tool("ip"), "netns", "exec", self.ns, "/bin/sh", "-c", "\n".join(script), "sh",
                   *setpriv, *argv]
        return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=60)

    def masqd(self, *flags: str, backend: str = "iptables", config: str = CONFIG,
              **options) -> subprocess.CompletedProcess[str]:
        self.config.write_text(config)
        return self.run(str(MASQD), "run", "--once", "--backend", backend, "--config", str(self.config),
                        "--log-format", "json", *flags, **options)


def _setpriv_caps(names: frozenset[str]) -> str:
    """``{"NET_ADMIN", "NET_RAW"}`` -> ``,+net_admin,+net_raw`` (to follow ``-all``)."""
    return "".join(f",+{name.lower()}" for name in sorted(names))


def _populate(directory: Path, grants: dict[str, str], setcap: str | None) -> None:
    """Copies of the granted files (with their capabilities when ``setcap``), and a symlink for
    every command masqd runs that resolves, on this machine, to one of them."""
    directory.mkdir(mode=0o755)
    for source, caps in grants.items():
        if not Path(source).is_file():
            pytest.skip(f"{source} (given capabilities by the Dockerfile) is not on this machine")
        copy = directory / Path(source).name
        shutil.copyfile(source, copy)
        copy.chmod(0o755)
        if setcap is not None:
            subprocess.run([setcap, caps, str(copy)], check=True, capture_output=True)
    for name in masqd_tools():
        found = shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin")
        target = found and os.path.realpath(found)
        if target in grants and name != Path(target).name:
            (directory / name).symlink_to(Path(target).name)


@pytest.fixture
def sandbox(node_ns) -> Iterator[Sandbox]:
    grants = setcap_grants()
    assert grants, "the Dockerfile gives no file capabilities"
    setcap = _tool("setcap")
    _tool("setpriv")
    root = Path(tempfile.mkdtemp(prefix="masqd-caps-"))
    try:
        root.chmod(0o755)
        _populate(root / "bin", grants, setcap)
        _populate(root / "nocaps", grants, None)
        uid, gid = image_user()
        box = Sandbox(root, node_ns, uid, gid, image_capabilities())
        box.config.write_text(CONFIG)
        box.config.chmod(0o644)
        box.overlays = _untraversable([Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix),
                                       Path(masqd.__file__), MASQD, root])
        if box.overlays and "overlay" not in Path("/proc/filesystems").read_text():
            pytest.skip(f"{box.overlays} cannot be entered by uid {uid} and overlayfs is unavailable")
        for i in range(len(box.overlays)):
            for part in ("upper", "work"):
                (root / f"overlay{i}" / part).mkdir(parents=True)
        probe = box.run(sys.executable, "-c", "pass")
        if probe.returncode != 0:  # the machine, not masqd: setpriv or the overlays did not work
            pytest.skip(f"cannot run Python as uid {uid} here (overlays for {box.overlays}): {probe.stderr.strip()}")
        yield box
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- reading the kernel back (as root, inside the namespace) --------------------------------------


def _iptables_rules(ns: str, binary: str = "iptables-nft-save") -> list[str]:
    return [line for line in netns.iptables_save(ns, binary=binary).splitlines()
            if line.startswith((f":{CHAIN} ", f"-A {CHAIN} ")) or line.endswith(f"-j {CHAIN}")]


def _nft_tables(ns: str) -> str:
    return netns.run(ns, "nft", "list", "tables").stdout


def _expected_iptables(cidrs: tuple[str, ...]) -> list[str]:
    return [f":{CHAIN} - [0:0]",
            '-A POSTROUTING -m comment --comment "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL '
            f'destination traffic to our custom {CHAIN} chain" -m addrtype ! --dst-type LOCAL -j {CHAIN}',
            *(f'-A {CHAIN} -d {cidr} -m comment --comment "{KEEP}" -j RETURN' for cidr in cidrs),
            f'-A {CHAIN} -m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE '
            '(must be last in chain)" -j MASQUERADE --random-fully']


def _failure(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# --- the model ---------------------------------------------------------------------------------------


def test_the_unprivileged_process_itself_holds_no_capability(sandbox):
    """What the pod's main process (masqd) gets: the image's uid, nothing effective or permitted,
    only the two capabilities left in its bounding set."""
    result = sandbox.run("cat", "/proc/self/status")
    assert result.returncode == 0, _failure(result)
    status = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert status["Uid"].split()[0] == str(sandbox.uid)
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapAmb"], 16) == 0
    assert int(status["CapBnd"], 16) == (1 << 12) | (1 << 13)  # CAP_NET_ADMIN (12), CAP_NET_RAW (13)
    assert {"NET_ADMIN", "NET_RAW"} == sandbox.caps


@pytest.mark.parametrize("backend", [pytest.param("iptables", id="iptables"), pytest.param("nftables", id="nftables")])
def test_non_root_masqd_programs_the_kernel_through_file_capabilities(sandbox, backend):
    result = sandbox.masqd(backend=backend)
    assert result.returncode == 0, _failure(result)
    if backend == "iptables":
        assert _iptables_rules(sandbox.ns) == _expected_iptables(("169.254.0.0/16", "10.0.0.0/8", "198.51.100.0/24"))
    else:
        listing = netns.run(sandbox.ns, "nft", "list", "table", "ip", "masqd").stdout
        assert "elements = { 10.0.0.0/8, 169.254.0.0/16," in listing and "198.51.100.0/24 }" in listing, listing
        assert "masquerade fully-random" in listing, listing


def test_non_root_masqd_prunes_live_flows_through_the_capped_conntrack_tool(sandbox):
    """masqd's own ctnetlink socket needs CAP_NET_ADMIN, which the image's process does not have:
    the kernel refuses it, and masqd reads and deletes through the capped ``conntrack`` instead.
    A flow source-NATed to a destination the rules keep (10.0.0.0/8) is stale after the first
    write; a flow to a masqueraded destination is left."""
    for destination in ("10.99.0.2", "203.0.113.2"):
        netns.run(sandbox.ns, "conntrack", "-I", "-p", "udp", "-s", "10.244.1.2", "-d", destination, "--sport", "40000",
                  "--dport", "53", "--timeout", "300", "--src-nat", "172.30.0.1")
    try:
        result = sandbox.masqd(backend="nftables")
        assert result.returncode == 0, _failure(result)
        events = log_events(result.stderr)
        assert [e["event"] for e in events if "conntrack tool" in e["event"]] == [
            "the kernel refuses masqd's own conntrack socket (no CAP_NET_ADMIN in this process); using the conntrack tool"]
        [applied] = [e for e in events if e["event"] == "rules applied"]
        assert applied["conntrack_deleted"] == 1, result.stderr
        left = netns.run(sandbox.ns, "conntrack", "-L", "-p", "udp", check=False).stdout
        assert "dst=203.0.113.2" in left and "dst=10.99.0.2" not in left, left
    finally:
        netns.run(sandbox.ns, "conntrack", "-F", check=False)


@pytest.mark.parametrize("case, options", [
    pytest.param("binaries-without-file-caps", {"bin_dir": "nocaps"}, id="no-file-caps"),
    pytest.param("allowPrivilegeEscalation-false", {"no_new_privs": True}, id="no-new-privs"),
])
@pytest.mark.parametrize("backend", [pytest.param("iptables", id="iptables"), pytest.param("nftables", id="nftables")])
def test_without_the_file_capabilities_masqd_fails_clearly_and_writes_nothing(sandbox, backend, case, options):
    """Binaries without file capabilities, or no_new_privs (under which the kernel ignores them):
    the kernel refuses, masqd exits 3 naming the tool and the kernel's answer, nothing lands."""
    result = sandbox.masqd(backend=backend, **options)
    assert result.returncode == EXIT_BACKEND, _failure(result)
    error = [line for line in result.stderr.splitlines() if line.startswith(f"error: {backend}: ")]
    assert error, _failure(result)
    assert "you must be root" in error[0], error  # iptables: Permission denied, nft: Operation not permitted
    assert _iptables_rules(sandbox.ns) == []
    assert "masqd" not in _nft_tables(sandbox.ns)


def test_non_root_daemon_follows_nft_monitor_and_restores_its_table(sandbox):
    """The kernel monitor needs what the writes need: ``nft monitor`` joins nftables' netlink
    group, which takes CAP_NET_ADMIN, and the capped nft has it. A table element deleted from
    outside is restored by the unprivileged daemon, woken by the monitor (the resync is an hour)."""
    logs = sandbox.root / "logs"
    logs.mkdir(mode=0o777)
    logs.chmod(0o777)
    sandbox.config.write_text("resyncInterval: 1h\n" + CONFIG)
    log = logs / "daemon.log"
    script = f"""
{MASQD} run --backend nftables --config {sandbox.config} --log-format json --v=4 --http-address= 2>{log} &
pid=$!
seen() {{ for _ in $(seq 200); do grep -q "$1" {log} && return 0; sleep 0.05; done; return 1; }}
seen '"rules applied"'
nft delete element ip masqd nonmasq4 '{{ 10.0.0.0/8 }}'
seen 'restored after outside change'
kill $pid
wait $pid
"""
    result = sandbox.run("/bin/sh", "-c", script)
    events = log_events(log.read_text())
    assert result.returncode == 0, _failure(result) + log.read_text()
    restored = [e for e in events if e["event"] == "rules restored after outside change"]
    assert [e["trigger"] for e in restored] == ["kernel-monitor"], log.read_text()
    assert not [e for e in events if e["level"] in ("error", "warning") and e is not restored[0]], log.read_text()
    listing = netns.run(sandbox.ns, "nft", "list", "table", "ip", "masqd").stdout
    assert "elements = { 10.0.0.0/8, 169.254.0.0/16," in listing, listing


def test_net_raw_missing_from_the_pod_stops_the_binaries_from_starting(sandbox):
    """A pod that adds NET_ADMIN but not NET_RAW: the kernel refuses to exec a binary whose file
    capabilities cannot all be granted (EPERM), so masqd cannot even run iptables."""
    result = sandbox.masqd(bounding=frozenset({"NET_ADMIN"}))
    assert result.returncode == EXIT_BACKEND, _failure(result)
    assert "Operation not permitted" in result.stderr, _failure(result)
    assert _iptables_rules(sandbox.ns) == []


def test_systemd_unit_model_ambient_capabilities_without_file_capabilities(sandbox):
    """examples/edge/masqd.service: a non-root user with AmbientCapabilities and
    NoNewPrivileges, plain binaries: the capabilities reach nft through inheritance (no_new_privs
    does not strip ambient ones). Runs with the unit's own ExecStart flags and the edge config."""
    service = unit()["Service"]
    assert service.get("NoNewPrivileges") == "yes"
    argv = unit_exec_start()
    flags = [arg for arg in argv[2:] if not arg.startswith("--config")]
    (config_flag,) = [arg for arg in argv if arg.startswith("--config")]
    config = EXAMPLES / "edge" / Path(config_flag.split("=", 1)[1]).name
    sandbox.config.write_text(config.read_text())
    ambient = unit_capabilities("AmbientCapabilities")
    result = sandbox.run(str(MASQD), "run", "--once", *flags, "--config", str(sandbox.config),
                         bin_dir="nocaps", bounding=unit_capabilities("CapabilityBoundingSet"), ambient=ambient,
                         no_new_privs=True)
    assert result.returncode == 0, _failure(result)
    listing = netns.run(sandbox.ns, "nft", "list", "table", "ip", "masqd").stdout
    for cidr in ("192.168.10.0/24", "10.0.0.0/8", "198.51.100.0/24"):
        assert cidr in listing, listing


# --- legacy iptables: why those nodes need the agent to run as root ------------------------------------


@pytest.fixture
def legacy(sandbox) -> Sandbox:
    probe = netns.run(sandbox.ns, "iptables-legacy-save", "-t", "nat", check=False)
    if probe.returncode != 0:
        pytest.skip(f"this kernel has no legacy (x_tables) nat table: {probe.stderr.strip()}")
    return sandbox


@pytest.mark.parametrize("mode, works", [
    pytest.param(0o600, False, id="0600-as-iptables-creates-it"),
    pytest.param(0o644, True, id="0644-as-kubelet-FileOrCreate-creates-it"),
])
def test_legacy_iptables_needs_to_open_the_xtables_lock(legacy, mode, works):
    """Legacy iptables opens the lock file before any change; the host's /run/xtables.lock is
    created by iptables as root with mode 0600, which the image's user cannot open. (A temporary
    stand-in is used through XTABLES_LOCKFILE; the host's lock is never touched.)"""
    lock = legacy.root / "xtables.lock"
    lock.touch()
    lock.chmod(mode)
    rules = legacy.root / "rules"
    rules.write_text("*nat\n:MQ-LOCK-PROBE - [0:0]\nCOMMIT\n")
    rules.chmod(0o644)
    result = legacy.run("/bin/sh", "-c", f"exec iptables-legacy-restore -w 5 --noflush < {rules}",
                        env={"XTABLES_LOCKFILE": str(lock)})
    if works:
        assert result.returncode == 0, _failure(result)
    else:
        assert result.returncode != 0
        assert f"can't open lock file {lock}: Permission denied" in result.stderr, _failure(result)


def test_legacy_table_list_is_readable_by_root_only(legacy):
    """masqd learns which legacy tables exist from /proc/net/ip_tables_names (asking
    iptables-legacy-save creates the table); the kernel makes it 0440 root."""
    result = legacy.run("cat", "/proc/net/ip_tables_names")
    assert result.returncode != 0 and "Permission denied" in result.stderr, _failure(result)
    assert "nat" in legacy.run("cat", "/proc/net/ip_tables_names", uid=0).stdout.split()


def test_legacy_nodes_work_as_root_with_only_the_two_capabilities(legacy):
    """The remedy the README gives: uid 0, bounding set NET_ADMIN + NET_RAW only, no_new_privs
    (allowPrivilegeEscalation: false), no file capabilities, a 0600 lock owned by root."""
    lock = legacy.root / "xtables.lock"
    lock.touch()
    lock.chmod(0o600)
    result = legacy.masqd("--iptables-mode", "legacy", uid=0, bin_dir="nocaps", no_new_privs=True,
                          env={"XTABLES_LOCKFILE": str(lock)})
    assert result.returncode == 0, _failure(result)
    assert _iptables_rules(legacy.ns, "iptables-legacy-save") == _expected_iptables(
        ("169.254.0.0/16", "10.0.0.0/8", "198.51.100.0/24"))



def test_cleanup_as_a_user_says_first_that_it_needs_root(sandbox):
    """As a plain user (binaries without capabilities), ``cleanup`` cannot read the legacy tables:
    the error leads with what is missing (root, or capabilities), not with a flag that would fail
    next with "you must be root" (issue 18, item 11)."""
    result = sandbox.run(str(MASQD), "cleanup", "--backend", "iptables", bin_dir="nocaps")
    assert result.returncode == EXIT_BACKEND, _failure(result)
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: iptables: masqd is not running as root, and changing iptables needs root "
                            "or CAP_NET_ADMIN"), error
