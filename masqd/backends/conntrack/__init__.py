"""Live flows: the kernel's conntrack table, which the reconciler prunes after an apply
(``--conntrack-reconcile``; which entries, :mod:`masqd.flows`, pure).

- :mod:`.messages`: ctnetlink's dump and delete messages (pure);
- :mod:`.table`: :class:`ConntrackTable`, the table over masqd's own ctnetlink socket, falling
  back to the tool when the kernel refuses it;
- :mod:`.listing`: the ``conntrack`` tool's listing and delete command (pure);
- :mod:`.tool`: :class:`ConntrackTool`, the table through the ``conntrack`` binary.

The names below load with their module when first used (:mod:`masqd.exports`).
"""

from masqd.exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "messages": ("Deleted",),
    "table": ("ConntrackTable",),
    "tool": ("ConntrackTool",),
})
