"""The Kubernetes API: settings (:mod:`~masqd.kube.settings`, pure), credentials and the client
(:mod:`~masqd.kube.client`), and the reflector that keeps a local copy of objects
(:mod:`~masqd.kube.reflector`). Only :mod:`masqd.sources.kube`, the inputs and the controller use
it; the reconciler never does. The names below are importable from here; each is loaded with its
module when first used, so reading the ``--kube-*`` flags does not load the API client library.
"""

from masqd.exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "settings": ("KubeSettings", "ObjectRef", "parse_object_ref"),
    "client": ("EgressNATPolicy", "describe_failure", "get_or_none", "load_kube_config", "make_client", "status_code"),
    "reflector": ("RETRIED", "WATCH_GRACE_SECONDS", "Reflector", "object_name"),
})
