"""Which iptables the host uses: legacy (x_tables) or nft (nf_tables), as kube-proxy's wrapper decides.

In a container the ``iptables`` binary may be either variant, and writing with the one the host
does not use silently does nothing useful: the host's kube-proxy and kubelet never see the rules.
``auto`` therefore looks at what is already there: kubelet's ``KUBE-IPTABLES-HINT`` chain (in the
mangle table, created in the mode kubelet uses) decides; otherwise the variant holding more rules
wins; with no rules anywhere, nft (the modern default).
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from masqd.errors import BackendError

log = structlog.get_logger("masqd.backend.iptables")

MODES = ("auto", "legacy", "nft")


@dataclass(frozen=True, slots=True)
class Binaries:
    """Names of the save/restore/main binaries for one family."""

    save: str
    restore: str
    main: str

    @property
    def legacy(self) -> bool:
        """Legacy tools create a table just by reading it: check /proc before reading."""
        return "-legacy-" in self.save

#: Chains kubelet creates in the variant it uses (the newer and the older name).
HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


def binaries_for(mode: str) -> dict[int, Binaries]:
    """The binaries of one variant (``legacy`` or ``nft``), or the plain names for ``system``."""
    if mode == "system":
        return {4: Binaries("iptables-save", "iptables-restore", "iptables"),
                6: Binaries("ip6tables-save", "ip6tables-restore", "ip6tables")}
    return {4: Binaries(f"iptables-{mode}-save", f"iptables-{mode}-restore", f"iptables-{mode}"),
            6: Binaries(f"ip6tables-{mode}-save", f"ip6tables-{mode}-restore", f"ip6tables-{mode}")}


def installed_modes() -> tuple[str, ...]:
    """The variants whose binaries are on PATH (``legacy``, ``nft``), in that order."""
    return tuple(m for m in ("legacy", "nft") if shutil.which(binaries_for(m)[4].save) and shutil.which(binaries_for(m)[4].restore))


def count_rules(save_text: str) -> int:
    """Rules (``-A`` lines) in iptables-save output."""
    return sum(1 for line in save_text.splitlines() if line.startswith("-A "))


def has_hint(save_text: str) -> bool:
    """Whether one of kubelet's hint chains is in this iptables-save output."""
    return any(line.startswith(f":{chain} ") for line in save_text.splitlines() for chain in HINT_CHAINS)


def choose_mode(legacy: tuple[bool, int], nft: tuple[bool, int]) -> str:
    """Pick a variant from (kubelet hint present, rule count) of each. Pure.

    As kube-proxy's iptables wrapper: a hint in nft wins, then a hint in legacy, then the variant
    with more rules, and nft when nothing tells them apart."""
    if nft[0]:
        return "nft"
    if legacy[0]:
        return "legacy"
    return "legacy" if legacy[1] > nft[1] else "nft"


def legacy_tables(family: int) -> frozenset[str]:
    """The x_tables (legacy) tables that exist for ``family`` in this network namespace.

    Read from /proc, because asking ``iptables-legacy-save -t TABLE`` creates TABLE. A missing
    file means the legacy modules are not loaded: no table. Raises
    :class:`~masqd.errors.BackendError` when the file exists but cannot be read (it is 0440
    root: masqd runs as a user other than root), since legacy iptables cannot be used then."""
    path = "/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names"
    try:
        with open(path) as listing:
            return frozenset(listing.read().split())
    except PermissionError:
        raise BackendError(f"masqd is not running as root, and changing iptables needs root or CAP_NET_ADMIN "
                           f"({path} is readable by root only). Run masqd as root; or, where the iptables binaries "
                           "carry the capability (the container image) and the node uses iptables-nft, pass "
                           "--iptables-mode nft (legacy iptables needs root itself)") from None
    except OSError:
        return frozenset()


def legacy_readable() -> bool:
    """Whether this process can see the legacy tables (see :func:`legacy_tables`)."""
    try:
        legacy_tables(4)
    except BackendError:
        return False
    return True


SaveRunner = Callable[[list[str]], Awaitable[str | None]]


async def detect_mode(run_save: SaveRunner) -> str:
    """``legacy`` or ``nft`` for this host (``system`` when neither variant binary exists).

    ``run_save(argv)`` returns the output of an iptables-save command, or ``None`` if it failed.
    Only plain ``iptables-save`` is run (never ``-t TABLE``), so detection creates no table.
    """
    modes = installed_modes()
    if not modes:
        return "system"
    if len(modes) == 1:
        return modes[0]
    if not legacy_readable():
        log.warning("cannot inspect legacy iptables as a user other than root; assuming the host "
                    "uses iptables-nft (run masqd as root on nodes that use legacy iptables)")
        return "nft"
    if not (legacy_tables(4) or legacy_tables(6)):
        # no legacy table at all: no hint and no rule there, so nft wins whatever it holds
        # (choose_mode), and reading it would only cost two processes
        return "nft"
    evidence = {}
    for mode in modes:
        hint = False
        rules = 0
        for binaries in binaries_for(mode).values():
            output = await run_save([binaries.save]) or ""
            hint = hint or has_hint(output)
            rules += count_rules(output)
        evidence[mode] = (hint, rules)
    return choose_mode(evidence["legacy"], evidence["nft"])
