"""masqd: an IP masquerade agent for Kubernetes nodes, a drop-in replacement for ip-masq-agent."""

__version__ = "0.1.0"

from masqd.hookspecs import hookimpl, hookspec  # noqa: E402 - the plugin markers: masqd.hookimpl

__all__ = ["__version__", "hookimpl", "hookspec"]
