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

MODES = ("auto", "legacy", "nft")


@dataclass(frozen=True, slots=True)
class Binaries:
    """Names of the save/restore/main binaries for one family."""

    save: str
    restore: str
    main: str

HINT_CHAIN = "KUBE-IPTABLES-HINT"


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
    """Whether kubelet's mode hint chain is in this (mangle table) output."""
    return any(line.startswith(f":{HINT_CHAIN} ") for line in save_text.splitlines())


def choose_mode(legacy: tuple[bool, int], nft: tuple[bool, int]) -> str:
    """Pick a variant from (hint present, rule count) of each. Pure."""
    if legacy[0] != nft[0]:
        return "legacy" if legacy[0] else "nft"
    return "legacy" if legacy[1] > nft[1] else "nft"


def legacy_tables_loaded() -> bool:
    """Whether this network namespace has any x_tables (legacy) table, without creating one."""
    for names in ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"):
        try:
            with open(names) as listing:
                if listing.read().strip():
                    return True
        except OSError:
            continue
    return False


SaveRunner = Callable[[list[str]], Awaitable[str | None]]


async def detect_mode(run_save: SaveRunner) -> str:
    """``legacy`` or ``nft`` for this host (``system`` when neither variant binary exists).

    ``run_save(argv)`` returns the output of an iptables-save command, or ``None`` if it failed.
    """
    modes = installed_modes()
    if not modes:
        return "system"
    if len(modes) == 1:
        return modes[0]
    evidence = {"legacy": (False, 0)}
    for mode in modes:
        if mode == "legacy" and not legacy_tables_loaded():
            continue  # nothing there; and iptables-legacy-save would create empty tables
        hint = rules = 0
        for family, binaries in binaries_for(mode).items():
            mangle = await run_save([binaries.save, "-t", "mangle"]) if family == 4 else None
            hint = hint or (mangle is not None and has_hint(mangle))
            everything = await run_save([binaries.save])
            rules += count_rules(everything or "")
        evidence[mode] = (bool(hint), rules)
    return choose_mode(evidence["legacy"], evidence["nft"])
