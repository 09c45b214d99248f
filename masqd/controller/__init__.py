"""``masqd controller``: translates ``EgressNATPolicy`` objects into the agents' ConfigMap.

This is the flow GKE documents, for any cluster. The controller

- creates the editable ``default`` policy (``NoSNAT`` to the RFC 1918 ranges) whenever it is absent;
- maintains the ``masqd-managed`` policy (label ``app.kubernetes.io/managed-by: masqd``) holding the
  cluster's own ranges: every Node's ``spec.podCIDRs`` (``spec.podCIDR`` when that is absent) and
  the ``--service-cidr`` / ``--node-cidr`` flags; anyone else's edit is reverted, a deletion undone
  (with no range to hold it is deleted: an empty policy would be invalid);
- writes the union of every valid ``NoSNAT`` policy's destinations into the ConfigMap's ``config``
  key, only when the text changes (IPv6 destinations only with ``--enable-ipv6``);
- records each policy's ``Accepted`` condition through the status subresource, only when it changes.

Layering, one module per concern (none imports a later one):

- :mod:`~masqd.controller.options`: the flags, validated (:class:`ControllerOptions`).
- :mod:`~masqd.controller.translation`: pure (API objects in, desired state out), tested
  table-driven: :func:`translate`, and what write puts one object right.
- :mod:`~masqd.controller.leader`: :class:`LeaderElector` holds a ``coordination.k8s.io/v1``
  Lease the way client-go's leader election does (acquire when free or expired, renew every retry
  period, stop all leader work at once when renewal has failed for longer than the renew
  deadline, release on shutdown). Only the leader writes.
- :mod:`~masqd.controller.loop`: the :class:`Controller` shell reads the API through
  :class:`~masqd.kube.Reflector` watches and writes only what differs (each write re-reads the
  object first and retries on ``409 Conflict``); :func:`run_controller` is the process.

Every API failure is logged and retried after a jittered back-off; nothing here crashes the process.
"""

from masqd.exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "options": ("DEFAULT_LEASE", "ControllerOptions", "parse_cidr_flag"),
    "translation": ("ACCEPTED", "AGENT_CIDR_LIMIT", "CONFIG_KEY", "DEFAULT_POLICY", "MANAGED_BY", "MANAGED_BY_LABEL",
                  "MANAGED_POLICY", "MAX_MESSAGE", "PolicyStatus", "Translation", "cluster_cidrs", "default_policy_spec",
                  "find_condition", "format_time", "managed_policy_spec", "merge_condition", "network_key",
                  "render_config", "translate"),
    "leader": ("LeaderElector", "default_identity", "format_micro_time"),
    "loop": ("CONFLICT_RETRIES", "Controller", "run_controller"),
})
