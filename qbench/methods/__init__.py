"""Quantization methods, registered by name. Adding a method is one file in this package.

Every module here is imported on first use of the package, so its ``@register`` decorators run.
"""

from __future__ import annotations

import importlib
import pkgutil

from qbench.methods.registry import DTYPES, LoadRequest, Method, get, names, register, torch_dtype

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "registry":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["DTYPES", "LoadRequest", "Method", "get", "names", "register", "torch_dtype"]
