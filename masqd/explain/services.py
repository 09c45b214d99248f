"""``explain --live`` follows kube-proxy's Services: traffic to a ClusterIP, an external IP or a
NodePort leaves the node addressed to one of the Service's endpoints (kube-proxy DNATs it before
routing), so what masqd's rules do with it is what they do with the endpoint. For an address that
is a Service frontend in the rules the kernel holds (:class:`~masqd.backends.services.ServiceMap`,
read back by the backend), each Service port is named with its endpoints, each endpoint explained
as any address is, and kube-proxy's own masquerade (its mark, then its postrouting rule) is said
where it applies: to every packet of external traffic, to packets from outside the cluster CIDR
(``--from`` decides which), to an endpoint reaching itself. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from masqd.backends.base import BEFORE, MASQUERADES, ForeignRule, LiveRules
from masqd.backends.services import NODE_PORT, ServiceFrontend, ServiceMap
from masqd.explain.model import (HEADLINES, MASQUERADE, Address, EndpointRoute, Explanation, ServiceRoute,
                                 Verdict)

#: What explains one endpoint address: (desired verdict or ``None``, the kernel's verdict).
EndpointExplainer = Callable[[Address], tuple[Verdict | None, Verdict]]


def service_routes(address: Address, live: LiveRules | None, source: Address | None,
                   explain_endpoint: EndpointExplainer) -> tuple[ServiceRoute, ...]:
    """The Service ports kube-proxy DNATs traffic to ``address`` to (none: it is not a frontend,
    or kube-proxy's rules were not read), each endpoint explained with ``explain_endpoint``."""
    family = live.family(address.version) if live is not None else None
    if family is None:
        return ()
    services = family.services
    kube_rule = next((rule for rule in family.foreign if services.requires_mark(rule.mark)), None)
    routes = []
    for frontend in services.at(address):
        endpoints = []
        for endpoint in frontend.endpoints:
            marked = frontend.marked(source, endpoint) if services.masquerades_marked else False
            desired, verdict = explain_endpoint(endpoint.address)
            if marked:
                rule = kube_rule or ForeignRule(f"{services.postrouting} (kube-proxy)", BEFORE, MASQUERADES,
                                                certain=True, kind="chain")
                own = verdict.masqd or verdict.action
                verdict = Verdict(MASQUERADE, masqd=own, foreign=(rule,), decided_by=rule)
            endpoints.append(EndpointRoute(endpoint, Explanation(endpoint.address, desired, verdict), marked))
        marked = frontend.marked(source) if services.masquerades_marked else False
        routes.append(ServiceRoute(frontend, tuple(endpoints), services, marked))
    return tuple(routes)


def headline(explanation: Explanation) -> str:
    """The first line for an address kube-proxy DNATs."""
    ports = len(explanation.services)
    where = explanation.services[0].services.where
    return (f"{explanation.shown_address}: DNATed by kube-proxy ({where}) to the endpoints of "
            f"{ports} Service port{'s' if ports != 1 else ''}: masqd's rules see the endpoint, not this address")


def route_lines(explanation: Explanation, block: Callable[[Explanation], list[str]]) -> list[str]:
    """The lines under :func:`headline`: per Service port, its endpoints (each as ``block``
    formats an explanation, indented), then kube-proxy's own masquerade of it."""
    lines = []
    for route in explanation.services:
        frontend, services = route.frontend, route.services
        at = "" if frontend.kind != NODE_PORT else f" on {_nodeport_where(services)}"
        count = len(route.endpoints)
        lines.append(f"  {frontend.label}{at} ({frontend.chain}) -> {count} endpoint{'s' if count != 1 else ''}:")
        for endpoint in route.endpoints:
            shown = endpoint.explanation
            # marked traffic is kube-proxy's to masquerade: not compared with masqd's desired verdict
            text = block(Explanation(shown.address, None if endpoint.marked else shown.desired, shown.live))
            text[0] = text[0].replace(f"{shown.address}:", f"{endpoint.endpoint}:", 1)
            lines += [f"    {line}" for line in text]
            if endpoint.marked:
                hairpin = "" if route.marked else "an endpoint reaching itself through the Service: "
                own = HEADLINES.get(shown.live.masqd or "", shown.live.masqd)
                lines.append(f"      {hairpin}kube-proxy marks it {services.mark:#x}, so {services.postrouting} "
                             f"masquerades it; masqd's rules alone: {own}")
        lines += [f"  {line}" for line in _kube_masquerade(frontend, services, route.marked)]
        if not route.endpoints:
            lines.append("    kube-proxy lists no endpoints for it (traffic is rejected or dropped)")
    return lines


def _nodeport_where(services: ServiceMap) -> str:
    if services.nodeports_local:
        return "every address of this node"
    return ", ".join(map(str, services.nodeport_addresses)) or "the node's addresses"


def _kube_masquerade(frontend: ServiceFrontend, services: ServiceMap, marked: bool | None) -> list[str]:
    """What kube-proxy's own masquerade does with traffic to ``frontend``."""
    if not services.masquerades_marked:
        return []
    how = (f"kube-proxy marks it {services.mark:#x} and {services.postrouting} masquerades marked traffic, "
           "whatever masqd's rules decide")
    if frontend.marks_all:
        return [f"all traffic to it is masqueraded by kube-proxy: {how}"]
    unless = ", ".join(map(str, frontend.marks_unless_from))
    if marked is None:
        return [f"from sources outside {unless} (the cluster CIDR) it is masqueraded by kube-proxy: {how} "
                "(--from SOURCE explains one)"]
    if marked:
        return [f"from this source (outside {unless}, the cluster CIDR) it is masqueraded by kube-proxy: {how}"]
    if frontend.marks_unless_from:
        return [f"from this source (inside {unless}, the cluster CIDR) kube-proxy does not mark it: masqd's rules "
                "decide, per endpoint"]
    return []


def other_ports_prefix(explanation: Explanation) -> str:
    """How the address's own verdict is introduced under a Service: it holds for the ports
    kube-proxy does not DNAT."""
    ports = ", ".join(sorted({f"{r.frontend.protocol}/{r.frontend.port}" for r in explanation.services}))
    return f"traffic to other ports than {ports} is not DNATed: "


def routes_json(explanation: Explanation, verdict_json: Callable[[Verdict | None], dict]) -> list[dict]:
    """The ``services`` of an address's JSON object (``--output json``)."""
    out = []
    for route in explanation.services:
        frontend = route.frontend
        out.append({
            "service": frontend.service, "kind": frontend.kind, "protocol": frontend.protocol, "port": frontend.port,
            "address": None if frontend.address is None else str(frontend.address), "chain": frontend.chain,
            "read_from": route.services.where,
            "kube_proxy_masquerades": route.marked if route.services.masquerades_marked else False,
            "masquerade_unless_from": [str(net) for net in frontend.marks_unless_from],
            "masquerades_all": frontend.marks_all,
            "endpoints": [{"endpoint": str(e.endpoint), "address": str(e.endpoint.address), "port": e.endpoint.port,
                           "kube_proxy_masquerades": e.marked, "drift": e.drift,
                           "desired": verdict_json(e.explanation.desired), "live": verdict_json(e.explanation.live)}
                          for e in route.endpoints],
        })
    return out

