"""Backends: ways to program masquerade rules. See :mod:`masqd.backends.base` for the interface;
they are offered to ``--backend`` by the built-in backends plugin. Each kernel backend is a
package (:mod:`.iptables`, :mod:`.nftables`); :mod:`.tools` is the one place processes run;
:mod:`.leftovers` finds what another backend left behind."""

from masqd.exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {"leftovers": ("leftover_backends",)})
