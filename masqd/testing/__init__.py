"""Test support for plugin authors and for masqd's own tests. The fixtures are a ``pytest11``
plugin (:mod:`masqd.testing.fixtures`: installed with masqd, active in any test run that has
pytest; nothing to import); the rest is imported from here, each part loaded when first used, so
:mod:`masqd.testing.netns` can be used without pytest or an event loop.

Fixtures:

``masqd_plugins(*plugins, hook_timeout=...)``
    A :class:`masqd.plugins.Plugins` with masqd's default plugins and the given plugin objects
    (modules, classes' instances) registered, exactly as masqd registers entry-point plugins,
    so hook names and signatures are checked the same way. Installed entry-point plugins are not
    loaded, so the test sees only what it registers. To test ``describe_cidrs`` (called only by
    ``masqd explain``): ``await plugins.describe_cidrs(await plugins.contributions(config, options))``.

``masqd_dry_run(*plugins, options=AgentOptions(), hook_timeout=...)``
    A :class:`DryRunAgent`: masqd's agent on the dry-run backend with those plugins.
    ``agent.apply(config_text)`` runs one pass exactly as ``masqd run --once`` does (each event
    source's ``read_once()`` is awaited first, ``context.once`` is true) against a config file
    holding ``config_text`` (``None``: no file, the defaults) and returns a :class:`DryRunResult`:
    ``rules`` (the iptables-restore text the dry-run backend holds), ``nonmasq`` (family ``4`` /
    ``6`` -> the non-masquerade CIDRs in rule order), ``contributions`` (plugin -> its CIDRs),
    ``audits`` (this pass's :class:`~masqd.audit.AuditEvent` values) and ``error`` (why the new
    state was rejected, else ``None``). The agent keeps its state between calls, like the daemon:
    after a rejected state the rules last applied stay. ``apply_async()`` does the same from an
    async test.

Running a whole agent (from an async test: pytest-asyncio, or anyio's pytest plugin)::

    from masqd.agent import build_agent
    from masqd.backends.dryrun import DryRunBackend
    from masqd.config import AgentOptions
    from masqd.testing import make_plugins, running, wait_until

    backend = DryRunBackend()  # logs what it would apply; backend.applied is the RuleSet it holds
    agent = build_agent(AgentOptions(), backend=backend, config=tmp_path / "config",
                        plugins=make_plugins(MyPlugin()))
    async with running(agent):  # the daemon, without signal handling; stopped when the block ends
        await wait_until(lambda: "192.0.2.0/24" in backend.last_rendered, "my CIDR applied")
        assert agent.status.readiness()[0]  # AgentStatus: what /healthz, /readyz and /metrics read

:func:`masqd.agent.build_agent` takes the flags (``AgentOptions``), a ``backend``, the ``config``
(a path, config inputs, or a loader) and optionally ``plugins``, ``kube`` settings and
``once=True`` for a one-shot agent, whose ``await agent.run_once()`` is one pass as ``masqd run
--once`` makes it (it raises :class:`~masqd.errors.SourceReadError` when a source's ``read_once``
fails, :class:`~masqd.errors.ConfigError` when the new state is rejected).
:func:`wait_until` fails the test with a ``TimeoutError`` naming what it waited for (inside
``running``, wrapped in the task group's ``ExceptionGroup``); :func:`event_source` finds one of
the agent's event sources to look at. :mod:`masqd.testing.fake_nft` is an in-memory ``nft``
that tracks table contents, for backend tests; :mod:`masqd.testing.netns` builds throw-away
network namespaces (one empty, or pod -> node -> dest) and reads what the kernel holds in them,
:mod:`masqd.testing.kube_proxy` loads kube-proxy-shaped Service rules (iptables or nftables) into one,
and :mod:`masqd.testing.processes` reads what ``/proc`` says of a process (dead or reaped, its
children, CPU time, RSS), for kernel-facing tests and for the scripts in ``benchmarks/`` alike.
"""

from masqd.exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "harness": ("WAIT_SECONDS", "DryRunAgent", "DryRunResult", "event_source", "make_plugins", "running", "wait_until"),
    "fixtures": ("masqd_dry_run", "masqd_plugins"),
})
