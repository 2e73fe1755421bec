"""Lazy package exports: names resolve to their module on first use, so importing a package whose
members pull in Lightning, transformers or PEFT (seconds of import) stays cheap."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` that imports `exports[name]` (a module path) when
    `name` is first asked for. Use as `__getattr__ = lazy_exports(__name__, _EXPORTS)`."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
