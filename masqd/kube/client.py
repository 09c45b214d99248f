"""The Kubernetes API client: credentials, the client, the ``EgressNATPolicy`` resource, and reading
what a failed request says."""

from __future__ import annotations

from typing import Any

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.generic_resource import create_global_resource

from masqd.errors import CredentialsError
from masqd.kube.settings import KubeSettings

#: The GKE custom resource masqd reads (cluster scoped).
EgressNATPolicy = create_global_resource("networking.gke.io", "v1", "EgressNATPolicy", "egressnatpolicies")


def load_kube_config(path: str | None) -> KubeConfig:
    """Credentials: ``path`` when given, else the in-cluster service account, else
    ``$KUBECONFIG`` / ``~/.kube/config``. Raises :class:`~masqd.errors.CredentialsError` saying
    what was tried."""
    try:
        if path:
            return KubeConfig.from_file(path)
        return KubeConfig.from_env()
    except (LightkubeConfigError, OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        if path:
            raise CredentialsError(f"no usable Kubernetes credentials in --kubeconfig {path}: {exc}; check the "
                                   "path, or leave --kubeconfig out in a pod with a service account") from None
        raise CredentialsError("no usable Kubernetes credentials (in-cluster service account, $KUBECONFIG, "
                               f"~/.kube/config): {exc}; pass --kubeconfig PATH or run in a pod with a service "
                               "account") from None


def api_server(config: KubeConfig) -> str:
    """The API server's URL the credentials name (``https://10.96.0.1:443``), for messages."""
    try:
        return str(config.get().cluster.server)
    except Exception:  # a config lightkube accepted but cannot resolve: the error comes with the request
        return "(unknown address)"


def make_client(settings: KubeSettings, config: KubeConfig | None = None) -> AsyncClient:
    """An API client for ``settings`` (credentials loaded now, so a missing file fails at start-up)."""
    config = config or load_kube_config(settings.kubeconfig)
    return AsyncClient(config, timeout=httpx2.Timeout(settings.request_timeout), field_manager="masqd")


def status_code(exc: BaseException) -> int | None:
    """The HTTP status of an API failure (a watch's ERROR event counts), else ``None``."""
    if isinstance(exc, ApiError) and exc.status is not None:
        return exc.status.code
    if isinstance(exc, httpx2.HTTPStatusError):
        return exc.response.status_code
    return None


def describe_failure(exc: BaseException) -> str:
    """An API failure for a log line: ``HTTP 503: ...`` or ``ConnectError: ...``."""
    code = status_code(exc)
    text = str(exc) or type(exc).__name__
    return f"HTTP {code}: {text}" if code is not None else f"{type(exc).__name__}: {text}"


async def get_or_none(client: AsyncClient, resource: type, name: str, namespace: str | None = None) -> Any:
    """The object, or ``None`` when the API answers ``404 Not Found``."""
    try:
        if namespace is None:
            return await client.get(resource, name)
        return await client.get(resource, name, namespace=namespace)
    except ApiError as exc:
        if status_code(exc) == 404:
            return None
        raise
