"""Quantization methods, registered by name. Adding a method is one file in this package.

Every module here is imported on first use of the package, so its ``@register`` decorators run.
"""

from __future__ import annotations

import importlib
import pkgutil

from qbench.methods.registry import DTYPES, LoadRequest, Method, get, names, register, torch_dtype

# References first, so listings and error messages start with the unquantized methods.
for _name in sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda n: (n != "reference", n)):
    if _name != "registry":
        importlib.import_module(f"{__name__}.{_name}")

__all__ = ["DTYPES", "LoadRequest", "Method", "get", "names", "register", "torch_dtype"]
