"""The agent's status: what ``/healthz``, ``/readyz`` and ``/metrics`` read, in one object.

Only the reconciler writes it (:class:`masqd.reconcile.Reconciler`, as each pass goes); the HTTP
endpoint, the metrics and the tests only read it, so what they say can never disagree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from masqd.errors import MasqdError
from masqd.ruleset import RuleSet
from masqd.shadowing import summary

#: A pass still running after this many seconds makes the agent unhealthy (``/healthz``). A pass
#: is bounded well below it: plugin hooks have 5 s deadlines, iptables-restore waits at most 10 s
#: for the xtables lock per family, and a kernel tool that hangs is killed after 30 s
#: (:data:`masqd.backends.tools.TOOL_TIMEOUT_SECONDS`), failing the sync. A tool given longer
#: for a large table (:func:`masqd.backends.tools.tool_deadline`) extends it for as long as that
#: tool may run (:meth:`AgentStatus.allow_until`). (How long a pass takes at each scale:
#: benchmarks/RESULTS.md.)
HEALTH_DEADLINE_SECONDS = 60.0


@dataclass(eq=False)
class AgentStatus:
    """What the reconciler has done and is doing. Written by the reconciler only."""

    #: a longer pass is unhealthy (``/healthz``)
    health_deadline: float = HEALTH_DEADLINE_SECONDS
    #: the reconciler's loop is live
    running: bool = False
    #: monotonic start of the pass in progress; ``None`` between passes
    busy_since: float | None = None
    #: monotonic time until which the pass in progress is healthy however long it has run: the
    #: end of the deadline of the kernel tool it runs (:meth:`allow_until`)
    busy_allowed_until: float = 0.0
    #: passes completed, successful or not
    generation: int = 0
    #: passes that failed (a rejected config, a failed sync, an internal error)
    errors: int = 0
    #: why the last pass failed; ``None`` after a successful one
    last_error: MasqdError | None = None
    #: why the last sync failed; ``None`` once a sync of the newest valid state succeeded
    sync_failure: str | None = None
    #: why the newest config was rejected; ``None`` while it is valid
    config_failure: str | None = None
    #: SNAT addresses the newest state asks for that no interface here holds (see
    #: :class:`~masqd.errors.SnatAddressError`); when the rules applied SNAT to one, not ready.
    snat_missing: frozenset = frozenset()
    #: passes whose new state was rejected (config or plugins)
    config_rejections: int = 0
    #: the rule set the backend last confirmed
    applied: RuleSet | None = None
    #: the newest desired state that was accepted
    latest_valid: RuleSet | None = None
    #: wall time of the last sync that confirmed the newest valid state
    applied_at: float | None = None
    #: the last pass rewrote rules someone else had changed
    repaired: bool = False
    #: the merged config and plugin contributions the applied rules were computed from (the
    #: metrics count CIDRs by origin from it)
    applied_from: tuple | None = None
    #: rules masqd does not write that may masquerade traffic the applied rules keep
    #: (:class:`~masqd.shadowing.Shadowing`), as the last pass or drift check found them; named
    #: by ``/readyz`` (still ready: not masqd's doing) and counted by the metrics
    shadowing: tuple = ()

    def health(self) -> tuple[bool, str]:
        """Whether the reconciler loop is alive, and why (``/healthz``).

        Alive: its loop is running and either waiting for events (it then answers at once) or in
        a pass that began less than ``health_deadline`` seconds ago. A pass stuck longer (a hung
        iptables-restore, a wedged plugin) means the agent can no longer react, and a restart is
        the remedy; the rules stay in the kernel meanwhile.
        """
        if not self.running:
            return False, "reconciler loop is not running"
        if self.busy_since is None:
            return True, f"ok: reconciler idle; passes so far: {self.generation}"
        now = time.monotonic()
        busy = now - self.busy_since
        if busy > self.health_deadline and now > self.busy_allowed_until:
            return False, (f"reconciler stuck: one pass has run for {busy:.1f} s "
                           f"(deadline {self.health_deadline:g} s); passes so far: {self.generation}")
        if busy > self.health_deadline:
            return True, (f"ok: reconciler in a pass for {busy:.1f} s, running a kernel tool allowed "
                          f"{self.busy_allowed_until - now:.0f} s more for a large table; passes so far: {self.generation}")
        return True, f"ok: reconciler in a pass for {busy:.1f} s; passes so far: {self.generation}"

    def allow_until(self, seconds: float) -> None:
        """The pass in progress starts a kernel tool that may run ``seconds`` (its deadline, scaled
        to the rules it handles, and the grace for a killed one to exit): it is healthy until then,
        past :attr:`health_deadline` (a tool that overruns is killed and the pass fails, so a pass
        stuck for good still turns ``/healthz`` unhealthy)."""
        self.busy_allowed_until = max(self.busy_allowed_until, time.monotonic() + seconds)

    def readiness(self) -> tuple[bool, str]:
        """Whether the kernel holds the rules of the latest valid desired state, and why
        (``/readyz``; see :meth:`_readiness`), and the rules masqd does not write that may
        masquerade traffic it keeps (:attr:`shadowing`), which do not make it unready."""
        ready, text = self._readiness()
        if self.shadowing:
            text += f"; {summary(self.shadowing)}"
        return ready, text

    def _readiness(self) -> tuple[bool, str]:
        """Whether the kernel holds the rules of the latest valid desired state, and why.

        Not ready before the first sync succeeded, and until the newest accepted state has been
        synced after a failure (healing the older rules while the config is bad does not count:
        the kernel is still behind). A rejected config does not make the agent unready: the
        kernel holds the latest *valid* state, which is what a bad edit must not change; the
        rejection is named in the text.
        """
        if self.applied is None:
            reason = self.sync_failure or self.config_failure
            waiting = f"the last attempt failed: {reason}" if reason else "waiting for the first sync"
            return False, f"not ready: no rules applied yet; {waiting}"
        if self.sync_failure is not None:
            error = self.last_error
            if getattr(error, "wrote", False) or getattr(error, "written", ()):  # a write was cut short, or done in part
                return False, ("not ready: the last apply failed after writing; what the kernel holds is read back "
                               f"on the next pass: {self.sync_failure}")
            return False, f"not ready: the last apply failed, the kernel keeps older rules: {self.sync_failure}"
        if not self.holds_latest_valid:
            return False, "not ready: the newest valid config is being applied"
        gone = sorted(str(family.snat_to) for family in self.applied.families if family.snat_to in self.snat_missing)
        if gone:
            return False, (f"not ready: the rules applied SNAT to {', '.join(gone)}, no longer assigned to an interface "
                           "here: replies to those flows go to whoever holds it now; the rules stay until the address "
                           f"is back or the config changes ({self.config_failure})")
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.applied_at or 0))
        count = sum(len(family.nonmasq) for family in self.applied.families)  # cidrs() would hash every network
        text = f"ready: the kernel holds the desired rules ({count} CIDRs, checked {when})"
        if self.config_failure is not None:
            text += f"; the newest config was rejected and the rules last applied stay: {self.config_failure}"
        return True, text

    @property
    def holds_latest_valid(self) -> bool:
        """The rules applied are those of the newest accepted state (compared by identity first:
        equality of two 100k-CIDR rule sets is not free)."""
        latest = self.latest_valid
        return latest is None or self.applied is latest or self.applied == latest
