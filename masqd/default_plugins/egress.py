"""Default plugin: ``EgressNATPolicy`` objects as non-masquerade CIDRs (``--egress-nat-policies``).

It registers a watch on the cluster's policies (:class:`~masqd.sources.kube.ReflectorSource`;
one-shot commands read it once) and contributes the destinations of every valid ``NoSNAT`` policy through ``nonmasq_cidrs`` (and, for
``masqd explain``, names the policies listing each one through ``describe_cidrs``). An invalid
policy is skipped and reported once with its name; the others still apply. Without
``--enable-ipv6`` a policy's IPv6 destinations are left out (reported once) and its IPv4 ones
apply. Until the first list arrives (or without the flag) it contributes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from masqd.hookspecs import hookimpl
from masqd.provenance import Origin

if TYPE_CHECKING:  # the policy code is imported once --egress-nat-policies is used
    from masqd.policies import PolicySet

log = structlog.get_logger("masqd.egress_nat_policies")

NAME = "egress-nat-policies"


class EgressNATPolicies:
    """The plugin object (one per loaded plugin manager; it holds the watched policies)."""

    #: each contributed CIDR stands for the policies listing it (see masqd.hookspecs.nonmasq_cidrs)
    masqd_origin_kind = "policy"

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.policies: PolicySet | None = None  # as last contributed
        self.enabled = False  # --egress-nat-policies: a watch registered (run, or read once)
        self._fingerprint: tuple = ()
        self._reported: frozenset[str] = frozenset()

    @hookimpl
    def register_sources(self, register, context):
        kube = context.kube
        if kube is None or not kube.egress_nat_policies:
            return
        from masqd.kube.client import EgressNATPolicy  # the API client library: only when it is used
        from masqd.sources.kube import ReflectorSource

        self.enabled = True
        register(ReflectorSource(NAME, EgressNATPolicy, kube, self.update, what="EgressNATPolicy objects"))

    def update(self, objects: dict[str, Any]) -> str | None:
        """Take the watch's copy; returns why to reconcile when a policy's spec changed (the
        controller writing a policy's status changes nothing here)."""
        from masqd.policies import as_mapping

        self.objects = dict(objects)
        self.enabled = True
        fingerprint = tuple(sorted((name, repr(as_mapping(obj).get("spec"))) for name, obj in objects.items()))
        if fingerprint == self._fingerprint:
            return None
        self._fingerprint = fingerprint
        return f"{len(objects)} policies"

    @hookimpl
    def nonmasq_cidrs(self, config, options):
        if not self.enabled:
            return None  # --egress-nat-policies not given: not a contributor at all
        from masqd.policies import parse_policies

        policies = parse_policies(self.objects.values(), allow_ipv6=options.enable_ipv6)
        self.policies = policies
        self._report(policies)
        return [str(net) for net in policies.nonmasq_origins()]

    @hookimpl
    def describe_cidrs(self, cidrs):
        """For ``masqd explain``: each contributed CIDR -> the policies listing it."""
        origins = {} if self.policies is None else self.policies.nonmasq_origins()
        return {net: [Origin("policy", name) for name in origins[net]] for net in cidrs if net in origins}

    def _report(self, policies: PolicySet) -> None:
        """Log each invalid policy, and each policy's IPv6 destinations left out, once."""
        from masqd.policies import Policy

        findings = {f"invalid {exc}": exc for exc in policies.invalid}
        findings.update({f"ignored {p.name} {p.ignored}": p for p in policies.valid if p.ignored})
        for key, finding in findings.items():
            if key in self._reported:
                continue
            if isinstance(finding, Policy):
                log.warning("EgressNATPolicy: IPv6 destinations left out (start masqd with --enable-ipv6 to use them)",
                            policy=finding.name, ignored=[str(net) for net in finding.ignored])
            else:
                log.error("EgressNATPolicy skipped: invalid", policy=finding.source.removeprefix("EgressNATPolicy "),
                          problems=[str(p) for p in finding.problems])
        self._reported = frozenset(findings)


def make_plugin() -> EgressNATPolicies:
    return EgressNATPolicies()
