"""Off switches for optimisations, read from the environment when the code they guard is set up."""

from __future__ import annotations

import os


def switch_on(variable: str) -> bool:
    """Whether ``variable`` leaves its optimisation on: 1 (the default, also when unset) or 0.

    Any other value is a ValueError, so a mistyped switch fails loudly
    instead of silently measuring the wrong build.
    """
    value = os.environ.get(variable, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{variable}={value!r}: expected 1 or 0")
    return value == "1"
