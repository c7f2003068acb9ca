"""Import every method module of this package once, so that its ``@register`` line runs."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__package__}.{_info.name}")
