"""The agent's Prometheus metrics (served on ``/metrics`` by :mod:`masqd.http`).

Counts of what happened are updated as it happens, from the audit events the reconciler emits
(:meth:`Metrics.observe`); everything that is *state* (the CIDRs applied, readiness, plugin
failures, watch restarts) is read when scraped from the objects that own it, so the numbers can
never disagree with what ``/readyz`` or the logs say. Each :class:`Metrics` has a registry of its
own, not prometheus-client's process-wide one, so two agents in one process (tests) do not mix.

Metrics (all prefixed ``masqd_``):

=========================================== ========= =================================================
``build_info{version,python,backend}``      gauge     always 1; the labels say what runs
``reconciles_total{trigger,result}``        counter   passes, by what woke the reconciler first (``file``,
                                                      ``timer``, ``configmap``, ``sighup``, ``startup``,
                                                      ``retry``, a plugin source) and result (``applied``,
                                                      ``unchanged``, ``rejected``, ``failed``)
``reconcile_duration_seconds{result}``      histogram time of a pass: config, plugin hooks and the sync
``last_successful_apply_timestamp_seconds`` gauge     when a sync last confirmed the kernel holds the
                                                      latest valid rules (written or found in place);
                                                      absent before the first
``config_errors_total``                     counter   passes whose new state was rejected (invalid config,
                                                      a plugin's veto or failure); grows on every resync
                                                      while the config stays bad
``config_valid``                            gauge     1 when the newest config was accepted
``drift_repairs_total``                     counter   writes that restored rules something else changed
``ready``                                   gauge     1 when ``/readyz`` answers 200
``nonmasq_cidrs{family,source}``            gauge     CIDRs of the applied rules, by where they came from
                                                      (``config``, ``defaults``, ``reserved-ranges``,
                                                      ``link-local``, ``plugin``, ``policy``); a CIDR with
                                                      two kinds of origin counts for each; the entries as
                                                      listed (not their longest-prefix flattening)
``decision_cidrs{family,list,source}``      gauge     the entries of the decision model's other CIDR lists
                                                      in the applied rules: ``list`` is the config key
                                                      (``masqueradeCIDRs``, ``masqueradeSourceCIDRs``,
                                                      ``nonMasqueradeSourceCIDRs``), ``source`` where they
                                                      came from (``config``; for ``masqueradeCIDRs`` also
                                                      ``plugin``, ``policy``: ``masquerade_cidrs``); no
                                                      series for a list no entry is in
``plugin_errors_total{plugin,hook}``        counter   hook calls that raised, hung or returned garbage
``kube_watch_restarts_total{watch,reason}`` counter   Kubernetes watches restarted: ``expired`` (410, a
                                                      relist), ``error`` (a failed request, retried after
                                                      a back-off), ``stalled`` (a silent connection dropped)
``kube_watch_synced{watch}``                gauge     1 once the watch's first list arrived
``shadowing_rules{family}``                 gauge     rules masqd does not write that may masquerade
                                                      traffic it keeps (:mod:`masqd.shadowing`), as the
                                                      last pass or drift check found them; 0 from
                                                      start-up for each family masqd manages
=========================================== ========= =================================================

Every counter series that can occur is exported at 0 from start-up, so Prometheus' ``increase()``
and ``rate()`` see the first pass, error or restart: ``reconciles_total`` for each trigger (the
agent's own, :data:`AGENT_TRIGGERS`, and the name of each of its event sources) times each
result; ``plugin_errors_total`` for each loaded plugin and each of :data:`PLUGIN_HOOKS` it
implements; ``kube_watch_restarts_total`` for each watch and reason.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from masqd import __version__
from masqd.audit import RESULTS, AuditEvent
from masqd.config import AgentOptions
from masqd.flows import PROTOCOL_NAMES, mode_protocols
from masqd.provenance import list_counts, origin_counts
from masqd.status import AgentStatus

disable_created_metrics()  # no *_created series: they double the output and no alert uses them

#: Seconds: from a dry-run pass to a 100k-CIDR apply and lock waits (benchmarks/RESULTS.md).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: The triggers that are not an event source's name: the daemon's first pass and SIGHUP
#: (:mod:`masqd.daemon`), a failed sync tried again and a pass asked for outside the daemon
#: (:mod:`masqd.reconcile`). The sources' names are the others (``triggers`` of :class:`Metrics`).
AGENT_TRIGGERS: tuple[str, ...] = ("startup", "sighup", "retry", "manual")
#: The plugin hooks called while the agent runs whose failures are counted in
#: ``plugin_errors_total`` (the start-up ones, ``register_backends`` and ``register_sources``,
#: have failed or not before the first scrape; ``describe_cidrs`` runs in ``masqd explain`` alone).
PLUGIN_HOOKS: tuple[str, ...] = ("nonmasq_cidrs", "masquerade_cidrs", "validate_config", "audit")
#: Why a Kubernetes watch restarted: its reflector's counter of each.
WATCH_RESTART_REASONS: tuple[tuple[str, str], ...] = (("expired", "relists"), ("error", "failures"),
                                                       ("stalled", "stalls"))


class Metrics:
    """Every metric of one agent, read from its ``status`` (:class:`masqd.status.AgentStatus`).
    ``backend``: the backend's name; ``options``: the agent flags (they decide what the default
    CIDRs are); ``watches`` returns the objects running Kubernetes watches (each with ``what``
    and ``reflector``, see :class:`masqd.sources.kube.ReflectorSource`); ``triggers``: the names of
    the agent's event sources (with :data:`AGENT_TRIGGERS`, every trigger a pass can have)."""

    def __init__(self, status: AgentStatus, *, backend: str, options: AgentOptions, plugins: Any = None,
                 watches: Callable[[], Iterable[Any]] = tuple, triggers: Iterable[str] = (),
                 conntrack: str = "none"):
        self.status = status
        self.registry = CollectorRegistry(auto_describe=True)
        build = Gauge("masqd_build_info", "masqd build: always 1, the labels say what runs",
                      ["version", "python", "backend"], registry=self.registry)
        build.labels(__version__, platform.python_version(), backend).set(1)
        self.reconciles = Counter("masqd_reconciles", "Reconcile passes by first trigger and result",
                                  ["trigger", "result"], registry=self.registry)
        for trigger in dict.fromkeys((*AGENT_TRIGGERS, *(_first(t) for t in triggers))):
            for result in RESULTS:  # at 0 from the start, so increase() sees the first pass
                self.reconciles.labels(trigger, result)
        self.duration = Histogram("masqd_reconcile_duration_seconds", "Time of one reconcile pass",
                                  ["result"], buckets=DURATION_BUCKETS, registry=self.registry)
        for result in RESULTS:  # every series present from the start, so rate() works at once
            self.duration.labels(result)
        self.drift_repairs = Counter("masqd_drift_repairs", "Writes that restored rules changed by something else",
                                     registry=self.registry)
        self.conntrack_deleted = Counter("masqd_conntrack_deleted",
                                         "Conntrack entries deleted because an apply changed their traffic's NAT "
                                         "(--conntrack-reconcile)", ["family", "protocol"], registry=self.registry)
        self.conntrack_errors = Counter("masqd_conntrack_errors", "Passes whose conntrack step failed: the table "
                                        "could not be read or deletes were refused (tried again on the next pass)",
                                        registry=self.registry)
        for family, protocol in conntrack_series(conntrack, options.enable_ipv6):
            self.conntrack_deleted.labels(family, protocol)
        self.registry.register(_StateCollector(status, options, plugins, watches, _plugin_hooks(plugins)))

    def observe(self, event: AuditEvent) -> None:
        """Count one reconcile pass (an audit listener: cheap, never blocks)."""
        self.reconciles.labels(_first(event.trigger), event.result).inc()
        self.duration.labels(event.result).observe(event.duration)
        if event.repair:
            self.drift_repairs.inc()
        for family, counts in event.conntrack_deleted.items():
            for protocol, count in counts.items():
                self.conntrack_deleted.labels(family, protocol).inc(count)
        if event.conntrack_error is not None:
            self.conntrack_errors.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _StateCollector:
    """The metrics read from their owners at scrape time."""

    def __init__(self, status: AgentStatus, options: AgentOptions, plugins: Any, watches: Callable[[], Iterable[Any]],
                 plugin_hooks: Iterable[tuple[str, str]] = ()):
        self.status = status
        self.options = options
        self.plugins = plugins
        self.watches = watches
        #: the (plugin, hook) pairs whose errors are exported (at 0 until one happens)
        self.plugin_hooks = tuple(plugin_hooks)
        #: (applied, applied_from, non-masquerade CIDR counts, the other lists' counts) of the last scrape
        self._cidr_counts: tuple[object, object, dict, dict] | None = None

    def describe(self) -> list:
        return []  # collected at scrape time: nothing to check names against at registration

    def collect(self) -> Iterable[Any]:
        status = self.status
        yield _gauge("masqd_ready", "1 when /readyz answers 200", status.readiness()[0])
        yield _gauge("masqd_config_valid", "1 when the newest config was accepted", status.config_failure is None)
        yield CounterMetricFamily("masqd_config_errors", "Passes whose new state was rejected (invalid config, "
                                  "a plugin's veto or failure)", value=status.config_rejections)
        if status.applied_at is not None:
            yield _gauge("masqd_last_successful_apply_timestamp_seconds", "When a sync last confirmed the kernel "
                         "holds the latest valid rules (unix time)", status.applied_at)
        cidrs = GaugeMetricFamily("masqd_nonmasq_cidrs", "Non-masquerade CIDRs of the applied rules by family and "
                                  "origin", labels=["family", "source"])
        counts, lists = self._counts()
        for (family, source), count in sorted(counts.items()):
            cidrs.add_metric([family, source], count)
        yield cidrs
        decision = GaugeMetricFamily("masqd_decision_cidrs", "Entries of the applied rules' other CIDR lists by "
                                     "family, list (masqueradeCIDRs, masqueradeSourceCIDRs, nonMasqueradeSourceCIDRs) "
                                     "and origin (config, plugin, policy); nonMasqueradeCIDRs are masqd_nonmasq_cidrs",
                                     labels=["family", "list", "source"])
        for (family, listed, source), count in sorted(lists.items()):
            decision.add_metric([family, listed, source], count)
        yield decision
        failures = CounterMetricFamily("masqd_plugin_errors", "Plugin hook calls that raised, hung or returned "
                                       "something unusable", labels=["plugin", "hook"])
        counts = dict.fromkeys(self.plugin_hooks, 0)
        counts.update(getattr(self.plugins, "failures", {}))
        for (plugin, hook), count in sorted(counts.items()):
            failures.add_metric([plugin, hook], count)
        yield failures
        restarts = CounterMetricFamily("masqd_kube_watch_restarts", "Kubernetes watches restarted, by reason",
                                       labels=["watch", "reason"])
        synced = GaugeMetricFamily("masqd_kube_watch_synced", "1 once the watch's first list arrived", labels=["watch"])
        for watch in self.watches():
            reflector = getattr(watch, "reflector", None)
            what = getattr(watch, "what", "") or getattr(watch, "name", "")
            for reason, counter in WATCH_RESTART_REASONS:
                restarts.add_metric([what, reason], getattr(reflector, counter) if reflector is not None else 0)
            synced.add_metric([what], 1 if reflector is not None and reflector.synced else 0)
        yield restarts
        yield synced
        shadowing = GaugeMetricFamily("masqd_shadowing_rules", "Rules masqd does not write that may masquerade "
                                      "traffic it keeps (before or after its rules, no packet mark required)",
                                      labels=["family"])
        found = dict.fromkeys(("ipv4", "ipv6") if self.options.enable_ipv6 else ("ipv4",), 0)
        for item in status.shadowing:
            found[item.label] = found.get(item.label, 0) + 1
        for family, count in sorted(found.items()):
            shadowing.add_metric([family], count)
        yield shadowing

    def _counts(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str, str], int]]:
        """Non-masquerade CIDRs per (family, origin kind) and the other lists' entries per (family,
        list, origin kind) of the applied rules, computed at the first scrape after each pass that
        synced and reused until the next."""
        applied, applied_from = self.status.applied, self.status.applied_from
        cached = self._cidr_counts
        if cached is not None and cached[0] is applied and cached[1] is applied_from:
            return cached[2], cached[3]
        if applied is None or applied_from is None:
            counts, lists = {}, {}
        else:
            counts = origin_counts(applied, *applied_from, self.options)
            lists = list_counts(*applied_from)
        self._cidr_counts = (applied, applied_from, counts, lists)
        return counts, lists


def conntrack_series(mode: str, ipv6: bool) -> list[tuple[str, str]]:
    """The ``(family, protocol)`` label pairs ``masqd_conntrack_deleted_total`` can have."""
    protocols = mode_protocols(mode)
    families = ("ipv4", "ipv6") if ipv6 else ("ipv4",)
    pairs = []
    for family in families:
        names = PROTOCOL_NAMES.values() if protocols is None else protocols
        for name in sorted({*names, "other"} if protocols is None else names):
            if (name, family) not in (("icmpv6", "ipv4"), ("icmp", "ipv6")):
                pairs.append((family, name))
    return pairs


def _first(trigger: str) -> str:
    """The trigger label of a pass: the first of its batch's triggers (``file,timer``: ``file``)."""
    return trigger.split(",", 1)[0]


def _plugin_hooks(plugins: Any) -> list[tuple[str, str]]:
    """(plugin, hook) for each loaded plugin and each of :data:`PLUGIN_HOOKS` it implements."""
    describe = getattr(plugins, "describe", None)
    if describe is None:
        return []
    return [(info.name, hook) for info in describe() for hook in info.hooks if hook in PLUGIN_HOOKS]


def _gauge(name: str, documentation: str, value: bool | float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))

