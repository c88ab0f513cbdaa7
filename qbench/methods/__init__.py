"""Quantization methods, registered by name. Adding a method is one file in this package.

Every module here is imported on first use of the package, so its ``@register`` decorators run; then the modules
named in $QBENCH_METHOD_MODULES (``mypkg.methods,other.mod``), so a method defined outside qbench is known to
the runner and to every case process alike.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from qbench.errors import UsageError
from qbench.methods.registry import (
    DTYPES,
    GROUP_NAMES,
    LoadRequest,
    Method,
    get,
    names,
    register,
    torch_dtype,
)

# References first, so listings and error messages start with the unquantized methods.
for _name in sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda n: (n != "reference", n)):
    if _name != "registry":
        importlib.import_module(f"{__name__}.{_name}")

METHOD_MODULES_ENV = "QBENCH_METHOD_MODULES"
for _name in filter(None, (n.strip() for n in os.environ.get(METHOD_MODULES_ENV, "").split(","))):
    try:
        importlib.import_module(_name)
    except ImportError as _e:
        raise UsageError(
            f"{METHOD_MODULES_ENV}: cannot import {_name} ({_e}); fix the variable or PYTHONPATH"
        ) from None

__all__ = ["DTYPES", "GROUP_NAMES", "LoadRequest", "Method", "get", "names", "register", "torch_dtype"]
