"""Lazy package-level exports (PEP 562), so ``import fedrg`` stays light and side-effect free.

A package lists ``name -> module`` once; the name is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package that re-exports ``exports`` lazily.

    Parameters
    ----------
    package
        The package's ``__name__`` (for error messages).
    exports
        Public name -> module that defines it.
    """

    def get_attr(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def dir_() -> list[str]:
        return sorted(set(exports) | set(importlib.import_module(package).__dict__))

    return get_attr, dir_
