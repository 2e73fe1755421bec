"""Importing code the user names (`--reward-fn package.module:function`), saying where it came from.

Under `python -m pmetal` the current directory is first on `sys.path`; under the `pmetal` script
it is not. `import_user_module` puts it first in both (so `--reward-fn mymod:fn` finds a `mymod.py`
beside the user however pmetal was started), imports what the user names, as Python would, and
logs the file when it lies in the current directory, with a warning naming the installed module it
shadows (a local `mypkg/` or `mypkg.py` shadows an installed `mypkg`).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from importlib.machinery import PathFinder
from types import ModuleType

log = logging.getLogger("pmetal")
_REPORTED: set[tuple[str, str]] = set()  # (module, file) already named: a tool resolved again logs nothing


def import_user_module(module_name: str) -> ModuleType:
    current_directory_on_path()
    module = importlib.import_module(module_name)
    report_local_module(module_name, module)
    return module


def current_directory_on_path() -> None:
    """The current directory first on `sys.path`, as `python -m` has it (once; '' counts as it)."""
    here = os.path.abspath(os.getcwd())
    if not any(os.path.abspath(p or os.curdir) == here for p in sys.path):
        sys.path.insert(0, here)
        importlib.invalidate_caches()


def report_local_module(module_name: str, module: ModuleType) -> None:
    """Name the file when `module_name` resolved to the current directory (once per module and process)."""
    top_name = module_name.partition(".")[0]
    origin = getattr(sys.modules.get(top_name, module), "__file__", None)
    if not origin:
        return
    origin, here = os.path.abspath(origin), os.path.abspath(os.getcwd())
    if os.path.commonpath([origin, here]) != here or (module_name, origin) in _REPORTED:
        return
    _REPORTED.add((module_name, origin))
    elsewhere = [p for p in sys.path if p and os.path.abspath(p) != here]
    installed = PathFinder.find_spec(top_name, elsewhere)
    if installed is not None and installed.origin and os.path.abspath(installed.origin) != origin:
        log.warning("module %s is imported from %s in the current directory, which shadows the installed %s; "
                    "rename the local file or run from another directory", module_name, origin, installed.origin)
    else:
        log.info("module %s is imported from %s (the current directory)", module_name, origin)
