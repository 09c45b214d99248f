"""Kubernetes settings: object references and the ``--kube-*`` flags, as values. Pure: no I/O,
and no API client library (the command line reads these flags without loading it)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from masqd.errors import FlagError

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """``NAMESPACE/NAME`` of a namespaced object, as given to ``--kube-configmap``."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_object_ref(text: str, flag: str) -> ObjectRef:
    """Parse ``NAMESPACE/NAME``; raises :class:`FlagError` naming ``flag``."""
    namespace, slash, name = text.partition("/")
    if not slash:
        raise FlagError(flag, text, "expected NAMESPACE/NAME, e.g. kube-system/ip-masq-agent")
    if not _DNS_LABEL.fullmatch(namespace):
        raise FlagError(flag, text, f"namespace {namespace!r} is not a valid name (lower-case letters, digits, '-')")
    if not _DNS_SUBDOMAIN.fullmatch(name):
        raise FlagError(flag, text, f"name {name!r} is not a valid object name (lower-case letters, digits, '-', '.')")
    return ObjectRef(namespace, name)


@dataclass(frozen=True, slots=True)
class KubeSettings:
    """How masqd talks to the Kubernetes API (the ``--kube-*`` flags).

    configmap: the ConfigMap whose ``config`` key is a config source (``--kube-configmap``).
    egress_nat_policies: watch ``EgressNATPolicy`` objects (``--egress-nat-policies``).
    kubeconfig: credentials file (``--kubeconfig``); when unset, the in-cluster service account,
        else ``$KUBECONFIG``, else ``~/.kube/config``.
    backoff_initial / backoff_max: seconds before the first retry after an API failure, and the
        cap the doubling stops at (0.5 s and 30 s).
    watch_timeout: seconds; each watch is ended by the server after 1-2x this (300 s).
    request_timeout: seconds a list or a connect may take before it is retried (10 s).
    """

    configmap: ObjectRef | None = None
    egress_nat_policies: bool = False
    kubeconfig: str | None = None
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    watch_timeout: float = 300.0
    request_timeout: float = 10.0

    @property
    def enabled(self) -> bool:
        return self.configmap is not None or self.egress_nat_policies
