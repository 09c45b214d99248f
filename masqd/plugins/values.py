"""The values that pass between masqd and its plugins, and the checks on what plugins return.

What a hook returns is read inside its isolated call (:func:`materialize`: a generator that hangs
or raises is the plugin's failure, not masqd's) and validated here into typed values before
anything else sees it, so no string from a plugin reaches a rule text.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from masqd.cidrs import CIDRError, Network, parse_cidr
from masqd.config import AgentOptions
from masqd.errors import Problem, safe_repr, shorten
from masqd.events import EventSource
from masqd.provenance import Origin


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One loaded plugin, as ``masqd plugins`` lists it."""

    name: str
    hooks: tuple[str, ...]
    builtin: bool
    distribution: str | None = None  # the installed package providing it (entry-point plugins)
    version: str | None = None


@dataclass(frozen=True, slots=True)
class Contribution:
    """The CIDRs one plugin added, validated, in the order it returned them (repeats dropped).
    ``kind``: what they are, as the plugin declared (``plugin``, or ``policy`` for CIDRs that each
    stand for a policy object); provenance and the metrics classify them by it. ``masquerade``:
    they are masquerade entries (``masquerade_cidrs``), not destinations kept (``nonmasq_cidrs``)."""

    plugin: str
    cidrs: tuple[Network, ...]
    kind: str = "plugin"
    masquerade: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceContext:
    """What ``register_sources`` receives besides ``register`` (keyword-only).

    config_path: the first config file masqd reads (``--config``).
    options: the agent flags (:class:`masqd.config.AgentOptions`).
    resync_interval: returns the current ``resyncInterval`` in seconds (it changes with the config).
    on_resync_interval_change: ``on_resync_interval_change(callback)`` makes masqd call
        ``callback()`` whenever ``resyncInterval`` changes.
    config_inputs: every config input (files, directories, the API ConfigMap; see
        :mod:`masqd.inputs`); each names the event source watching it (``watcher()``), which the
        built-in sources plugin registers.
    kube: the Kubernetes flags (:class:`masqd.kube.KubeSettings`), or ``None`` when masqd does not
        talk to the API.
    once: a one-shot command (``validate``, ``render``, ``run --once``, ``explain``) registers the
        sources: none is run, each one's ``read_once()`` (if any) is called once instead.
    """

    config_path: str
    options: AgentOptions
    resync_interval: Callable[[], float]
    on_resync_interval_change: Callable[[Callable[[], None]], None]
    config_inputs: tuple = ()
    kube: Any = None
    once: bool = False


@dataclass(frozen=True, slots=True)
class RegisteredSource:
    """An event source a plugin registered: ``name`` becomes its events' trigger."""

    plugin: str
    name: str
    source: EventSource


def materialize(result: Any) -> Any:
    """A returned iterable read into a list (strings, bytes and mappings stay as they are)."""
    if result is None or isinstance(result, (str, bytes, Mapping)):
        return result
    if isinstance(result, Iterable):
        return list(result)
    return result


def materialize_mapping(result: Any) -> Any:
    """A returned mapping read into a dict of lists, inside the call (see :func:`materialize`)."""
    if not isinstance(result, Mapping):
        return result
    return {key: materialize(value) if not isinstance(value, (str, bytes, Mapping)) and isinstance(value, Iterable)
            else value for key, value in result.items()}


def contributed_network(item: Any) -> Network:
    """A CIDR a plugin returned (a string or an ``ipaddress`` network); raises :class:`CIDRError`."""
    if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return item
    return parse_cidr(item)


def described(plugin: str, cidr: Any, value: Any, key: str, problems: list[Problem]) -> tuple[Network, tuple] | None:
    """One ``describe_cidrs`` entry as ``(network, origins)``; unusable parts become problems."""
    try:
        net = contributed_network(cidr)
    except CIDRError as exc:
        problems.append(Problem(f"{key}[{safe_repr(cidr)[:60]}]", None, exc.reason))
        return None
    origins = []
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, str) and item.strip() and item.isprintable():
            origins.append(Origin("plugin", plugin, detail=item.strip()[:200]))
        elif isinstance(item, Origin) and item.kind == "policy" and isinstance(item.name, str) and item.name.isprintable():
            origins.append(Origin("policy", item.name))
        else:
            problems.append(Problem(f"{key}[{net}]", shorten(item), "expected a one-line text or an Origin of kind 'policy'"))
    return (net, tuple(origins)) if origins else None
