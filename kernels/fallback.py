"""One warning per reason when a backend hands a call to the exact torch reference: a result is never
silently slow, and a model with hundreds of layers does not print hundreds of warnings."""

from __future__ import annotations

import warnings

_warned: set = set()


def warn_once(category: type[Warning], reason: str, message: str, stacklevel: int = 5):
    key = (category, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=stacklevel)
