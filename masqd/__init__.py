"""masqd: an IP masquerade agent for Kubernetes nodes, a drop-in replacement for ip-masq-agent."""

__version__ = "0.1.0"
