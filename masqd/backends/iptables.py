"""The iptables backend: the upstream ip-masq-agent's rules, written with ``iptables-restore``.

Rendering and planning are pure functions over text; :class:`IptablesExecutor` is the only part
that runs binaries, and it can be swapped (tests inject a fake, the way httpx swaps transports).

Rules are rendered in ``iptables-save`` canonical form (option order, quoting, and the
11-decimal probability the kernel stores), so read-back is a plain comparison of lines: a sync
writes only when the chain or the POSTROUTING jump differs from the desired ones.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import anyio
import structlog

from masqd.backends.base import (AFTER, BEFORE, EITHER, INSIDE, KEEPS, MASQUERADES, ForeignRule, LiveFamily,
                                 LiveRules, SyncResult)
from masqd.backends.iptables_mode import Binaries, binaries_for, detect_mode, installed_modes, legacy_tables
from masqd.backends.tools import run_tool, script_line
from masqd.cidrs import Network
from masqd.errors import ApplyError, BackendError, ReadBackError
from masqd.ruleset import PORT_PROTOCOLS, FamilyRules, Masquerade, RuleSet

JUMP_COMMENT = "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom {chain} chain"
NONMASQ_COMMENT = "ip-masq-agent: local traffic is not subject to MASQUERADE"
MASQ_COMMENT = "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)"

log = structlog.get_logger("masqd.backend.iptables")

#: Seconds iptables-restore waits for a held xtables lock before giving up (the reconciler retries).
LOCK_WAIT_SECONDS = 10
#: How often a running iptables-restore is checked for waiting on the xtables lock (logged once).
LOCK_CHECK_SECONDS = 0.25
#: ``--random-fully`` needs iptables >= 1.6.2.
RANDOM_FULLY_MIN_VERSION = (1, 6, 2)

# --- pure rendering --------------------------------------------------------------------------------


def jump_rule(chain: str) -> str:
    """The POSTROUTING rule sending non-local traffic to ``chain`` (``-A`` line, save form)."""
    comment = JUMP_COMMENT.format(chain=chain)
    return f'-A POSTROUTING -m comment --comment "{comment}" -m addrtype ! --dst-type LOCAL -j {chain}'


def destination_match(net: Network) -> str:
    """``-d CIDR `` as iptables-save prints it: nothing for a /0 (it matches everything), and IPv6
    addresses with an embedded IPv4 (``::ffff:a.b.c.d``, ``::a.b.c.d``) in dotted form, as the C
    library's inet_ntop writes them; otherwise Python's compressed form, which is the same."""
    if net.prefixlen == 0:
        return ""
    if net.version == 6:
        packed = net.network_address.packed
        words = struct.unpack("!8H", packed)
        if words[:5] == (0,) * 5 and (words[5] == 0xFFFF or (words[5] == 0 and words[6] != 0)):
            head = "::ffff:" if words[5] == 0xFFFF else "::"
            return f"-d {head}{ipaddress.IPv4Address(packed[12:])}/{net.prefixlen} "
    return f"-d {net} "


def chain_rules(family: FamilyRules, chain: str, masquerade: Masquerade, random_fully: bool) -> tuple[str, ...]:
    """The ``-A`` lines of ``chain`` for one family, in order, exactly as ``iptables-save`` prints them."""
    rules = [
        f'-A {chain} {destination_match(net)}-m comment --comment "{NONMASQ_COMMENT}" -j RETURN'
        for net in family.nonmasq
    ]
    suffix = " --random-fully" if random_fully else ""
    for protocol in PORT_PROTOCOLS if masquerade.to_ports else ():
        for share in masquerade.port_shares():
            statistic = "" if share.probability is None else f" -m statistic --mode random --probability {format_probability(share.probability)}"
            rules.append(
                f'-A {chain} -p {protocol} -m comment --comment "{MASQ_COMMENT}"{statistic}'
                f" -j MASQUERADE --to-ports {share.ports}{suffix}"
            )
    rules.append(f'-A {chain} -m comment --comment "{MASQ_COMMENT}" -j MASQUERADE{suffix}')
    return tuple(rules)


def format_probability(probability: Fraction) -> str:
    """The probability as the kernel stores it (fixed point, 2**31 = 1) and iptables-save prints it."""
    stored = round(probability * 0x80000000)
    return f"{stored / 0x80000000:.11f}"


def render_restore(rules: tuple[str, ...], chain: str, *, jumps_present: int) -> str:
    """iptables-restore input that replaces ``chain`` with ``rules`` and leaves exactly one jump.

    ``:CHAIN - [0:0]`` flushes only that chain (with ``--noflush``); the jump is appended when
    missing and extra copies are deleted, so it is never duplicated.
    """
    lines = ["*nat", f":{chain} - [0:0]", *rules]
    jump = jump_rule(chain)
    if jumps_present == 0:
        lines.append(jump)
    lines.extend("-D" + jump[2:] for _ in range(jumps_present - 1))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class NatState:
    """What ``iptables-save -t nat`` shows of masqd's chain and jump. ``other_jumps``: POSTROUTING
    rules sending traffic to the chain that are not masqd's jump (someone edited it)."""

    chain_exists: bool
    rules: tuple[str, ...]
    jumps: int
    other_jumps: tuple[str, ...] = ()


def parse_nat_state(save_text: str, chain: str) -> NatState:
    """Extract ``chain`` and the count of masqd's POSTROUTING jumps from iptables-save output."""
    chains = parse_nat_chains(save_text)
    jump = jump_rule(chain)
    to_chain = re.compile(rf"(?:^| )-[jg] {re.escape(chain)}(?: |$)")
    postrouting = chains.get("POSTROUTING", ())
    return NatState(chain in chains, chains.get(chain, ()), sum(line == jump for line in postrouting),
                    tuple(line for line in postrouting if line != jump and to_chain.search(line)))


def plan(desired: tuple[str, ...], state: NatState, chain: str) -> tuple[str | None, str]:
    """The restore text to apply (``None`` when the kernel is in sync) and why."""
    reasons = []
    if not state.chain_exists:
        reasons.append(f"chain {chain} missing")
    elif state.rules != desired:
        reasons.append(f"chain {chain} differs")
    if state.jumps != 1:
        reasons.append(f"POSTROUTING jump count {state.jumps}, want 1")
    if not reasons:
        return None, "in sync"
    return render_restore(desired, chain, jumps_present=state.jumps), "; ".join(reasons)


_COMMENT = r'(?:-m comment --comment "(?:[^"\\]|\\.)*" )?'
_KEEP_RULE = re.compile(rf"(?:-d (?P<net>\S+) )?{_COMMENT}-j RETURN")
_MASQ_RULE = re.compile(rf"(?:-p (?P<protocol>\S+) )?{_COMMENT}(?:-m statistic --mode random --probability [0-9.]+ )?"
                        r"-j MASQUERADE(?: --to-ports [0-9]+(?:-[0-9]+)?)?(?: --random-fully)?")


def parse_nat_chains(save_text: str) -> dict[str, tuple[str, ...]]:
    """Every chain of the nat table in iptables-save output -> its ``-A`` lines, in order (a chain
    without rules is there with none)."""
    chains: dict[str, list[str]] = {}
    in_nat = False
    for line in save_text.splitlines():
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif not in_nat:
            continue
        elif line.startswith(":"):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            chains.setdefault(line.split(" ", 2)[1], []).append(line)
    return {name: tuple(rules) for name, rules in chains.items()}


@dataclass(frozen=True, slots=True)
class _RuleMatch:
    """What :func:`_read_rule` makes of one ``-A`` line: its ``-d`` (and whether negated), whether
    it has any other match (``conditional``: not evaluated here), and its target."""

    destination: Network | None
    negated: bool
    conditional: bool
    target: str | None
    goto: bool


#: Targets that rewrite the source address.
_SOURCE_NAT_TARGETS = frozenset({"MASQUERADE", "SNAT", "NETMAP"})
#: Targets that do not end the chain, so cannot decide whether a packet is masqueraded.
_PASSING_TARGETS = frozenset({"LOG", "NFLOG", "ULOG", "MARK", "CONNMARK", "TRACE", "AUDIT", "SET", "CLASSIFY",
                              "DSCP", "TOS", "TTL", "HL", "TCPMSS", "CHECKSUM", "SECMARK", "CONNSECMARK",
                              "IDLETIMER", "LED", "RATEEST", "TEE", "NOTRACK", "CT"})


def _read_rule(line: str, family: int) -> _RuleMatch:
    """Tokens of an iptables-save ``-A`` line, as far as deciding on a destination goes."""
    try:
        tokens = shlex.split(line)
    except ValueError:  # an unbalanced quote: keep only the target
        target = re.search(r" -([jg]) (\S+)", line)
        return _RuleMatch(None, False, True, target and target[2], bool(target) and target[1] == "g")
    destination, negated, conditional, negate = None, False, False, False
    index = 2  # after -A CHAIN
    while index < len(tokens):
        token = tokens[index]
        if token == "!":
            negate = True
            index += 1
            continue
        if token in ("-j", "-g"):
            target = tokens[index + 1] if index + 1 < len(tokens) else None
            return _RuleMatch(destination, negated, conditional, target, token == "-g")
        if token == "-d" and index + 1 < len(tokens) and destination is None:
            try:
                destination = ipaddress.ip_network(tokens[index + 1], strict=False)
                negated = negate
            except ValueError:
                conditional = True
            index += 2
        elif token == "-m" and tokens[index + 1:index + 3] == ["comment", "--comment"]:
            index += 4
        else:
            conditional = True
            index += 1
        negate = False
    if destination is not None and destination.version != family:
        conditional = True
    return _RuleMatch(destination, negated, conditional, None, False)


def _effects(rule: _RuleMatch, chains: Mapping[str, tuple[str, ...]], family: int, returns_keep: bool,
             seen: frozenset[str] = frozenset()) -> frozenset[str]:
    """What a rule may do to the source address: a set of :data:`MASQUERADES` / :data:`KEEPS`
    (empty: it cannot decide). ``returns_keep``: RETURN leaves the packet unmasqueraded here (in
    POSTROUTING it ends nat processing; in masqd's chain it leaves masqd's rules without a
    masquerade) instead of going back to a chain that goes on deciding."""
    target = rule.target
    if target is None or target in _PASSING_TARGETS:
        return frozenset()
    if target in _SOURCE_NAT_TARGETS:
        return frozenset({MASQUERADES})
    if target == "ACCEPT" or (target == "RETURN" and returns_keep):
        return frozenset({KEEPS})
    if target == "RETURN":
        return frozenset()
    if target not in chains or target in seen:  # an extension masqd does not know, or a loop
        return frozenset({MASQUERADES, KEEPS})
    # falling off (or RETURN from) a goto'd chain returns where the goto's chain would have
    found = frozenset({KEEPS}) if rule.goto and returns_keep else frozenset()
    for line in chains[target]:
        found |= _effects(_read_rule(line, family), chains, family, returns_keep and rule.goto, seen | {target})
    return found


def _foreign(line: str, stage: str, chains: Mapping[str, tuple[str, ...]], family: int,
             position: int = 0) -> ForeignRule | None:
    """``line`` (in POSTROUTING or masqd's chain) as a :class:`ForeignRule`; ``None`` when it
    cannot decide anything."""
    rule = _read_rule(line, family)
    effects = _effects(rule, chains, family, True)
    if not effects:
        return None
    effect = EITHER if len(effects) > 1 else next(iter(effects))
    certain = not rule.conditional and rule.target not in chains and effect != EITHER
    return ForeignRule(line, stage, effect, rule.destination, rule.negated, certain, position)


def postrouting_rules(chains: Mapping[str, tuple[str, ...]], chain: str, family: int) -> tuple[ForeignRule, ...]:
    """The nat POSTROUTING rules (of :func:`parse_nat_chains`) that may decide whether traffic is
    masqueraded: those before the first rule sending traffic to masqd's ``chain`` (all of them
    when there is none) act first; those after it act on what masqd's chain returns."""
    rules = chains.get("POSTROUTING", ())
    to_chain = re.compile(rf"(?:^| )-[jg] {re.escape(chain)}(?: |$)")
    first = next((index for index, line in enumerate(rules) if to_chain.search(line)), len(rules))
    found = [_foreign(line, BEFORE, chains, family) for line in rules[:first]]
    found += [_foreign(line, AFTER, chains, family) for line in rules[first + 1:] if not to_chain.search(line)]
    return tuple(rule for rule in found if rule is not None)


def live_family(state: NatState, family: int, desired: tuple[str, ...], chain: str,
                nat_chains: Mapping[str, tuple[str, ...]] | None = None) -> LiveFamily:
    """What the kernel does with traffic in one family, from masqd's chain and jumps as
    :func:`parse_nat_state` found them; ``desired`` (the chain's rules as a sync would write them)
    decides ``drift``. Rules are read the way the kernel walks them: RETURN rules (any comment,
    none, or ``-d`` omitted for 0/0) keep their destination, the first MASQUERADE without ``-p``
    ends the chain; anything else is ``unexpected`` (and, when it may decide, ``foreign``).
    ``nat_chains`` (:func:`parse_nat_chains` of the same text): the other nat rules, so the
    POSTROUTING rules around masqd's jump are ``foreign`` too."""
    text, reason = plan(desired, state, chain)
    drift = None if text is None else reason
    chains = nat_chains or {}
    outside = postrouting_rules(chains, chain, family) if nat_chains is not None else ()
    if not state.chain_exists:
        return LiveFamily(family, present=False, drift=drift, foreign=outside)
    unexpected: list[str] = []
    inside: list[ForeignRule] = []
    if state.jumps > 1:
        unexpected.append(f"POSTROUTING jump to {chain} present {state.jumps} times")
    unexpected += [f"POSTROUTING rule masqd does not write sends traffic to {chain}: {line}" for line in state.other_jumps]
    nonmasq: list[Network] = []
    masquerade = False
    prefix = f"-A {chain} "
    for rule in state.rules:
        body = rule.removeprefix(prefix)
        if masquerade:
            unexpected.append(f"after the final MASQUERADE, never reached: {rule}")
        elif keep := _KEEP_RULE.fullmatch(body):
            try:
                nonmasq.append(ipaddress.ip_network(keep["net"] or ("0.0.0.0/0" if family == 4 else "::/0"), strict=False))
            except ValueError:
                unexpected.append(f"rule masqd does not write: {rule}")
        elif masq := _MASQ_RULE.fullmatch(body):
            masquerade = masq["protocol"] is None  # a -p rule is one --to-ports share; the last has none
        else:
            unexpected.append(f"rule masqd does not write: {rule}")
            if (found := _foreign(rule, INSIDE, chains, family, len(nonmasq))) is not None:
                inside.append(found)
    local = state.jumps > 0 or any("! --dst-type LOCAL" in line for line in state.other_jumps)
    before = tuple(rule for rule in outside if rule.stage == BEFORE)
    after = tuple(rule for rule in outside if rule.stage == AFTER)
    return LiveFamily(family, present=True, hooked=state.jumps > 0 or bool(state.other_jumps), local_exempt=local,
                      nonmasq=tuple(nonmasq), masquerade=masquerade, unexpected=tuple(unexpected), drift=drift,
                      foreign=(*before, *inside, *after))


def parse_iptables_version(text: str) -> tuple[int, ...] | None:
    """``iptables v1.8.9 (nf_tables)`` -> ``(1, 8, 9)``; ``None`` when there is no version."""
    match = re.search(r"v(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return None
    return tuple(int(part or 0) for part in match.groups())


# --- executor: the only code here that runs binaries -------------------------------------------------


class IptablesExecutor(Protocol):
    """Runs iptables binaries for one family (4 or 6)."""

    async def save(self, family: int) -> str: ...

    async def restore(self, family: int, text: str) -> None: ...

    async def version(self, family: int) -> str: ...


DEFAULT_BINARIES = binaries_for("system")

_ERROR_LINE = re.compile(r"(?:Error occurred at line: (\d+)|line (\d+) failed)")


class SubprocessExecutor:
    """Runs the real ``iptables-save`` / ``iptables-restore -w --noflush`` through anyio."""

    def __init__(self, binaries: dict[int, Binaries] | None = None):
        self.binaries = binaries or DEFAULT_BINARIES
        self._lock_wait_logged = False  # until a restore gets the lock: retries do not log it again

    async def save(self, family: int) -> str:
        binaries = self.binaries[family]
        if binaries.legacy and "nat" not in legacy_tables(family):
            return ""  # no legacy nat table, so nothing of masqd's; reading it would create it
        command = [binaries.save, "-t", "nat"]
        result = await run_tool(command, None)
        if result.returncode != 0:
            raise ReadBackError(command, result.stderr.decode(errors="replace") or f"exit {result.returncode}")
        return result.stdout.decode(errors="replace")

    async def restore(self, family: int, text: str) -> None:
        command = [self.binaries[family].restore, "-w", str(LOCK_WAIT_SECONDS), "--noflush"]
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._log_lock_wait, command)
            try:
                result = await run_tool(command, text.encode())
            except Exception as exc:  # raised as it is below, not wrapped in an exception group
                error = exc
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")
            raise ApplyError(command, result.returncode, stderr, _failed_line(stderr, text))
        self._lock_wait_logged = False

    async def _log_lock_wait(self, command: list[str]) -> None:
        """While the restore runs: say once that it waits for the xtables lock (iptables 1.8.8
        and later print nothing when the wait ends in success, and a failure after the wait is
        logged by the reconciler); not again on retries until a restore has had the lock.
        Earlier versions poll the lock instead of blocking on it, so they are not seen waiting
        here; their own message is in the error when the wait fails."""
        while not self._lock_wait_logged:
            await anyio.sleep(LOCK_CHECK_SECONDS)
            if _child_waits_for_xtables_lock():
                log.warning("waiting for the xtables lock, held by another process", command=" ".join(command),
                            wait_seconds=LOCK_WAIT_SECONDS, lock=xtables_lock_path())
                self._lock_wait_logged = True

    async def version(self, family: int) -> str:
        command = [self.binaries[family].main, "--version"]
        result = await run_tool(command, None)
        if result.returncode != 0:
            raise ReadBackError(command, result.stderr.decode(errors="replace"))
        return result.stdout.decode(errors="replace")


def xtables_lock_path() -> str:
    """The xtables lock file legacy iptables takes: ``XTABLES_LOCKFILE``, else ``/run/xtables.lock``."""
    return os.environ.get("XTABLES_LOCKFILE") or "/run/xtables.lock"


def _child_waits_for_xtables_lock() -> bool:
    """Whether a child of this process (the running iptables-restore) is blocked on a flock of
    the xtables lock file, as ``/proc/locks`` lists waiters (``N: -> FLOCK ADVISORY WRITE PID
    MAJ:MIN:INODE ...``); the nft variant takes no lock and is never seen waiting."""
    try:
        lock = os.stat(xtables_lock_path())
        with open("/proc/locks") as locks:
            waiters = [line.split() for line in locks if " -> FLOCK " in line]
    except OSError:
        return False
    device = f"{os.major(lock.st_dev):02x}:{os.minor(lock.st_dev):02x}:{lock.st_ino}"
    return any(len(fields) > 6 and fields[6] == device and parent_pid(fields[5]) == os.getpid()
               for fields in waiters)


def parent_pid(pid: str | int) -> int | None:
    """The parent of process ``pid`` (``/proc/PID/stat``), or None when it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _failed_line(stderr: str, text: str) -> str | None:
    match = _ERROR_LINE.search(stderr)
    return script_line(text, int(match.group(1) or match.group(2))) if match else None


# --- the backend ------------------------------------------------------------------------------------


def render_ruleset(ruleset: RuleSet, *, random_fully_supported: bool = True) -> str:
    """The iptables-restore input for each family, as written to a kernel holding none of it."""
    parts = []
    for family in ruleset.families:
        rules = _family_rules(ruleset, family, random_fully_supported)
        tool = "iptables-restore" if family.family == 4 else "ip6tables-restore"
        parts.append(f"# {tool} --noflush\n" + render_restore(rules, ruleset.chain, jumps_present=0))
    return "".join(parts)


def _family_rules(ruleset: RuleSet, family: FamilyRules, random_fully_supported: bool) -> tuple[str, ...]:
    random_fully = ruleset.masquerade.random_fully and random_fully_supported
    return chain_rules(family, ruleset.chain, ruleset.masquerade, random_fully)


class IptablesBackend:
    """Programs the upstream agent's nat chain and POSTROUTING jump, IPv4 and (optionally) IPv6.

    Each family is read back and written on its own; after a write the family is read back again,
    so a rule the kernel stores differently from how it was rendered is reported as an error
    instead of being rewritten (and blamed on someone else) on every resync.

    ``mode`` picks the iptables variant: ``legacy``, ``nft``, or ``auto`` (detected on first use,
    see :mod:`masqd.backends.iptables_mode`). An injected ``executor`` is used as it is.
    """

    name = "iptables"

    def __init__(self, executor: IptablesExecutor | None = None, *, random_fully_supported: bool | None = None,
                 mode: str = "auto"):
        self.mode = mode if executor is None else "given"
        self.executor: IptablesExecutor = executor or SubprocessExecutor(
            None if mode == "auto" else binaries_for(mode))
        #: Whether the iptables binary knows --random-fully; None until :meth:`probe` ran.
        self.random_fully_supported = random_fully_supported

    async def probe(self) -> None:
        """Pick the iptables variant (``auto``), then learn whether ``--random-fully`` is available."""
        if self.mode == "auto":
            self.mode = await detect_mode(_save_or_none)
            self.executor = SubprocessExecutor(binaries_for(self.mode))
            log.info("iptables variant chosen", mode=self.mode)
        if self.random_fully_supported is None:
            version = parse_iptables_version(await self.executor.version(4))
            self.random_fully_supported = version is not None and version >= RANDOM_FULLY_MIN_VERSION

    def render(self, ruleset: RuleSet) -> str:
        """What a sync would write to an empty kernel (``--random-fully`` assumed when not probed)."""
        return render_ruleset(ruleset, random_fully_supported=self.random_fully_supported is not False)

    async def sync(self, ruleset: RuleSet) -> SyncResult:
        await self.probe()
        written: list[str] = []
        reasons: list[str] = []
        for family in ruleset.families:
            try:
                reason = await self._sync_family(ruleset, family)
            except BackendError as exc:
                exc.written = tuple(written)
                raise
            if reason is not None:
                written.append(family.label)
                reasons.append(reason)
        return SyncResult(tuple(written), tuple(reasons))

    async def _sync_family(self, ruleset: RuleSet, family: FamilyRules) -> str | None:
        """Bring one family in line; return why it was written, or None when it was in sync."""
        desired = _family_rules(ruleset, family, bool(self.random_fully_supported))
        state = parse_nat_state(await self.executor.save(family.family), ruleset.chain)
        text, reason = plan(desired, state, ruleset.chain)
        if text is None:
            return None
        await self.executor.restore(family.family, text)
        after = parse_nat_state(await self.executor.save(family.family), ruleset.chain)
        if plan(desired, after, ruleset.chain)[0] is not None:
            raise BackendError(
                f"{family.label}: iptables accepted the rules but reads them back differently; "
                f"wrote {list(desired)}, read back {list(after.rules)} with {after.jumps} jump(s)"
            )
        return reason

    async def read_back(self, ruleset: RuleSet) -> LiveRules:
        """What the kernel holds of ``ruleset``'s chain and jump, per family; reads only (the
        variant is picked as :meth:`sync` would pick it)."""
        await self.probe()
        families = []
        for family in ruleset.families:
            desired = _family_rules(ruleset, family, bool(self.random_fully_supported))
            text = await self.executor.save(family.family)
            state = parse_nat_state(text, ruleset.chain)
            families.append(live_family(state, family.family, desired, ruleset.chain, parse_nat_chains(text)))
        return LiveRules(self.name, f"chain {ruleset.chain}", tuple(families))

    async def cleanup(self, chain: str, families: tuple[int, ...] = (4, 6)) -> tuple[str, ...]:
        """Remove ``chain`` and masqd's POSTROUTING jumps to it, nothing else. With ``auto`` every
        installed iptables variant is cleaned (masqd may have run in either). A family whose
        tables cannot be read (no IPv6 nat on this kernel) has nothing of masqd's and is skipped.
        Returns what was removed, e.g. ``("ipv4 chain IP-MASQ-AGENT (nft)", "ipv4 jump (nft)")``."""
        variants = installed_modes() if self.mode == "auto" else ()
        targets = [(v, SubprocessExecutor(binaries_for(v))) for v in variants] or [(self.mode, self.executor)]
        removed: list[str] = []
        for variant, executor in targets:
            for family in families:
                try:
                    state = parse_nat_state(await executor.save(family), chain)
                except ReadBackError:
                    if family == 4:
                        raise
                    continue
                text = render_removal(chain, state)
                if text is not None:
                    await executor.restore(family, text)
                    where = f" ({variant})" if len(targets) > 1 else ""  # name it when several were looked at
                    label = f"ipv{family}"
                    removed += [f"{label} chain {chain}{where}"] * state.chain_exists
                    removed += [f"{label} jump{where}"] * bool(state.jumps)
        return tuple(removed)


def render_removal(chain: str, state: NatState) -> str | None:
    """iptables-restore input deleting masqd's jumps and chain (``None``: nothing to remove)."""
    if not state.chain_exists and not state.jumps:
        return None
    lines = ["*nat", *("-D" + jump_rule(chain)[2:] for _ in range(state.jumps))]
    if state.chain_exists:
        lines += [f"-F {chain}", f"-X {chain}"]
    return "\n".join([*lines, "COMMIT"]) + "\n"


async def _save_or_none(command: list[str]) -> str | None:
    try:
        result = await run_tool(command)
    except ReadBackError:
        return None
    return result.stdout.decode(errors="replace") if result.returncode == 0 else None
