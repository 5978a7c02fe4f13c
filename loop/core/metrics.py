"""Reading a version's metrics (``Version.metrics``) by name, aliases included.

The gate decides on these numbers (``loop.gate``) and the app's Versions tab plots them, so both
read them here: a metric stored under an alias is found by both or by neither.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

HELDOUT_KEYS = ("heldout_loss", "held_out_loss", "eval_loss")
REGRESSION_KEYS = ("regression_loss",)


def metric(metrics: Mapping[str, Any] | None, keys: Iterable[str]) -> float | None:
    """The first of ``keys`` present in ``metrics`` as a float (None when absent or not a number)."""
    for key in keys:
        value = (metrics or {}).get(key)
        if value is None or isinstance(value, bool):
            continue
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


def heldout_loss(metrics: Mapping[str, Any] | None) -> float | None:
    return metric(metrics, HELDOUT_KEYS)


def regression_loss(metrics: Mapping[str, Any] | None) -> float | None:
    return metric(metrics, REGRESSION_KEYS)
