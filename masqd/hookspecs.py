"""The hooks masqd calls, for plugins (pluggy project ``masqd``, entry-point group ``masqd``).

A plugin is a module or object with functions marked ``@masqd.hookimpl`` whose names (and
argument names, any subset) match the specifications below. Hooks are synchronous and should be
cheap: masqd calls third-party implementations in a worker thread with a deadline, so one that
hangs is reported and skipped instead of stalling the agent. Anything long-running belongs in an
event source's ``async def run(notify)`` (see :func:`register_sources`).

Isolation: every implementation is called on its own. One that raises, returns something
unusable or misses its deadline is reported with its plugin's name (``PLUGIN.HOOK``); for
``nonmasq_cidrs`` and ``validate_config`` the new desired state is then rejected and the rules
last applied stay, exactly as for an invalid config file. Implementations run in pluggy's order:
last registered first, ``tryfirst`` / ``trylast`` respected. Hook wrappers are not supported.

masqd's own backends and event sources are registered through these hooks by the default
plugins in :mod:`masqd.default_plugins`, exactly as a third-party plugin registers its own; the
rest of masqd never names a default plugin.

Changes to the hooks, newest first (each keeps plugins written against the earlier hooks working):

- Since 0.2.0: ``masquerade_cidrs`` contributes masquerade entries, which override a shorter
  kept range by longest-prefix match (the config's ``masqueradeCIDRs``).

- Since 0.1.0: ``register_sources`` is also called by the one-shot commands
  (``context.once``), which call an event source's optional ``read_once()`` instead of ``run``;
  ``SourceContext`` is keyword-only and no longer carries masqd's drift-check wiring. A plugin
  may declare what its contributed CIDRs are with a ``masqd_origin_kind`` attribute (see
  :func:`nonmasq_cidrs`).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("masqd")
hookimpl = pluggy.HookimplMarker("masqd")


@hookspec
def nonmasq_cidrs(config, options):
    """More destinations that keep the pod source address.

    Called on every reconcile, after the config file was read and validated.

    :param config: the validated config file (:class:`masqd.config.MasqConfig`).
    :param options: the agent flags (:class:`masqd.config.AgentOptions`), e.g. ``enable_ipv6``.
    :return: an iterable of CIDRs, each a string (``"203.0.113.0/24"``) or an
        ``ipaddress.IPv4Network`` / ``IPv6Network``; ``None`` for none. Every item is validated like
        a config CIDR (parsed, aligned, IPv6 only with ``--enable-ipv6``); one bad item rejects
        the whole new state. Contributions count toward ``cidrLimit`` only when the config file
        sets ``cidrLimit``; a CIDR already listed (in the config or by another plugin) is kept
        once. Each is reported with the plugin's name by ``render``, the logs and ``explain``.

    What the CIDRs are: a plugin object (or module) may set ``masqd_origin_kind = "policy"`` when
    each CIDR it contributes stands for a policy object of the cluster (as the built-in
    ``EgressNATPolicy`` plugin does); the metrics then count them as ``source="policy"``, and its
    ``describe_cidrs`` should name the policies (``Origin("policy", NAME)``) so that ``explain``
    says the same. The default is ``"plugin"``; any other value is refused at start-up.
    """


@hookspec
def masquerade_cidrs(config, options):
    """More destinations masqueraded even inside a range that keeps the pod source address.

    Called on every reconcile, right after :func:`nonmasq_cidrs`. These are masquerade entries,
    beside the config's ``masqueradeCIDRs``: for each destination the longest matching prefix
    among the kept CIDRs (config, defaults, link-local, every plugin's ``nonmasq_cidrs``, policies)
    and the masquerade entries decides, so ``169.254.169.254/32`` here masquerades the metadata
    server while the rest of ``169.254.0.0/16`` keeps the pod address. An entry no kept range
    holds changes nothing (such traffic is masqueraded anyway).

    :param config: the validated config file (:class:`masqd.config.MasqConfig`).
    :param options: the agent flags (:class:`masqd.config.AgentOptions`).
    :return: an iterable of CIDRs (strings or ``ipaddress`` networks); ``None`` for none. Each is
        validated like a config CIDR; one bad item rejects the whole new state. A CIDR that is
        also kept, with the same prefix length (by the config, a plugin or a policy), rejects the
        new state too, naming both: a destination is either kept or masqueraded. Contributions
        count toward ``cidrLimit`` (of ``masqueradeCIDRs``) only when the config file sets
        ``cidrLimit``. ``describe_cidrs`` is called with them too, and ``explain`` names the plugin.
    """


@hookspec
def validate_config(config, cidrs, options):
    """A veto over the new desired state.

    Called on every reconcile once the complete non-masquerade list is known.

    :param config: the validated config file (:class:`masqd.config.MasqConfig`).
    :param cidrs: every non-masquerade CIDR that would be applied (config, defaults, every
        plugin's contributions; link-local not included), as ``ipaddress`` networks, in order.
    :param options: the agent flags.
    :return: a list of problem strings (empty or ``None``: no objection). Any problem rejects the
        new state; the rules last applied stay, and each problem is reported with the plugin's name.
    """


@hookspec
def audit(event):
    """Record an apply attempt.

    Called after every apply attempt, successful or not, with a frozen
    :class:`masqd.audit.AuditEvent`: ``time``, ``trigger``, ``backend``, ``result`` (``applied`` /
    ``unchanged`` / ``rejected`` / ``failed``), ``added`` / ``removed`` (per family label
    ``ipv4`` / ``ipv6``, the CIDRs as strings), ``written``, ``error`` (text or ``None``),
    ``duration``, ``repair``; ``event.as_dict()`` gives them as plain values. In the daemon the
    call is made from a task of its own, so a slow audit hook never delays an apply. A one-shot
    command whose event sources could not be read (``read_once`` failed) made no attempt: no
    event. Return value ignored; an exception is logged with the plugin's name.
    """


@hookspec
def register_backends(register):
    """Offer backends, selectable with ``--backend NAME``.

    Called once at start-up.

    :param register: call ``register(name, factory)`` for each backend. ``factory`` is a backend
        class (or any callable) taking one :class:`masqd.backends.base.BackendSettings` and
        returning an object that implements :class:`masqd.backends.base.Backend`. A name already
        registered is an error naming both plugins.
    """


@hookspec
def register_sources(register, context):
    """Offer event sources: the daemon runs them for as long as it runs; one-shot commands read them once.

    Called once when an agent is built: by the daemon, and by the one-shot commands
    (``validate``, ``render``, ``run --once``, ``explain``; ``context.once`` is then true). The
    daemon runs each source's ``run``; a one-shot command never does. Instead, before it computes
    the rules, it awaits each source's optional ``async def read_once()``, which brings what the
    source holds up to date once, as the first list of a watch would (the built-in Kubernetes
    sources list their objects). ``read_once`` that raises (or takes longer than 30 s) makes the
    command fail with exit code 4, naming the source and its plugin
    (:class:`masqd.errors.SourceReadError`); one that raises
    :class:`masqd.errors.CredentialsError` is a usage error (exit code 2).

    The daemon's first pass does not wait for any source: it applies what the config and the
    plugins offer at once (so a restarted agent puts the file's rules back immediately), and
    a source's data follows through ``notify``. A plugin whose contributions must not be applied
    without its data (the masquerading they prevent would break something) says so from
    ``validate_config`` until its source has read once: the state is then rejected and the rules
    last applied stay.

    Sharing state with the hooks: ``run`` and ``read_once`` run on the event loop, while a
    third-party plugin's other hooks run in a worker thread, one call at a time. Hand data over
    by replacing an immutable value in one assignment (a tuple of CIDRs), or guard it with a
    ``threading.Lock``.

    :param register: call ``register(source)`` for each source: an object with ``async def
        run(notify)`` and optionally ``name`` (default: the plugin's name). ``run`` is scheduled in
        the daemon's task group; it calls ``notify(reason)`` (never blocks; call it from the event
        loop, i.e. from ``run`` itself, not from a thread of your own) whenever something it
        watches may have changed, and masqd reconciles soon after. ``run`` must be a coroutine
        function and must not block the event loop (use ``anyio.to_thread`` for blocking work). A source that raises is logged
        with its plugin's name and restarted after a back-off; one that returns is not restarted.
    :param context: a :class:`masqd.plugins.SourceContext` (config path and inputs, agent flags,
        Kubernetes flags, the current resync interval, whether this is a one-shot command), for
        sources that need them.
    """


@hookspec
def describe_cidrs(cidrs):
    """Say where this plugin's CIDRs came from, for ``masqd explain``.

    Called only by ``masqd explain`` (never by the daemon), after ``nonmasq_cidrs``, once per
    plugin that contributed CIDRs.

    :param cidrs: the CIDRs this plugin's ``nonmasq_cidrs`` just returned, validated, as
        ``ipaddress`` networks in the order returned (repeats dropped).
    :return: a mapping of CIDR (network or string) -> one description or a list of them, for any
        of ``cidrs`` (others are ignored); ``None`` for nothing. A description is a short text
        (``"file /etc/masqd/cidrs/corp line 3"``), shown after the plugin's name, or a
        :class:`masqd.provenance.Origin` of kind ``policy`` (``Origin("policy", NAME)``) for a
        CIDR that comes from a policy object. A CIDR not described is shown as coming from the
        plugin. A hook that raises, hangs or returns something unusable only loses its detail:
        ``explain`` warns, naming the plugin, and goes on.
    """
