"""matplotlib.pyplot on the headless backend, imported on first use.

Modules that draw import this instead of matplotlib: sweep trials import them but never draw, and matplotlib costs
every trial worker a second at import.
"""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt
