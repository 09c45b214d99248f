"""Package re-exports resolved when first used (PEP 562).

A package's ``__init__`` keeps its public names importable from the package (``from
masqd.backends.nftables import NftablesBackend``) without importing every submodule up front: a
pure submodule (rendering, parsing) can then be imported without pulling in its siblings that run
processes or talk to the API, and the command line starts without libraries it does not use.
Monkeypatch a name where it is looked up (its submodule), not on the package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``, whose ``exports`` map each submodule
    (relative name) to the public names it provides."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # found once; later lookups are plain attributes
        return value

    def __dir__() -> list[str]:
        return sorted(set(where) | set(vars(sys.modules[package])))

    return __getattr__, __dir__, sorted(where)
