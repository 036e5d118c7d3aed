"""Names of a package loaded on first use (PEP 562), so ``import hpkit`` and ``hpkit --help`` stay quick."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_names(package: str, namespace: dict, api: dict[str, str], modules: dict[str, str]
               ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``api`` maps a public name to the submodule (relative to
    ``package``) that defines it, ``modules`` maps a name to a submodule returned as a whole. A loaded name
    is stored in ``namespace`` (the package's globals), so later lookups skip ``__getattr__``."""

    def __getattr__(name: str) -> object:
        if name in modules:
            return importlib.import_module(f"{package}.{modules[name]}")
        if name in api:
            value = getattr(importlib.import_module(f"{package}.{api[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(api) | set(modules))

    return __getattr__, __dir__
