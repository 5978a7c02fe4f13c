"""Canary rollout, the acting side: promote the live canary, roll it back, or leave it running.

The statistic and the rule are the core's (``loop.core.canary``, whose docstring states them); this is
the cycle's first stage's part (``loop.cycle_stages.stage_canary``), which changes the registry.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from loop.core.canary import status, unservable
from loop.core.registry import Registry, RegistryError

log = logging.getLogger(__name__)


def check_canary(registry: Registry, store: Any, rules: Any, *, now: dt.datetime | None = None,
                 log_fn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Act on the live canary: promote it, roll it back, or leave it running.

    Returns ``{"canary": None}`` when none runs, else ``status()``'s dict plus ``action``
    (``promoted``, ``rolled_back`` or ``running``)."""
    say = log_fn or log.info
    pointer = registry.canary_pointer()
    if pointer is None:
        return {"canary": None}
    vid = pointer["version"]
    if registry.current_id() == vid:  # promoted, then interrupted before the canary pointer went
        registry.end_canary("promoted", reason="the canary is already current", expected=vid)
        return {"canary": vid, "action": "promoted", "reason": "the canary is already current"}
    broken = unservable(registry, vid)
    if broken:
        reason = f"the canary cannot be served: {broken}"
        log.error("rolling back canary %s: %s", vid, reason)
        say(f"canary {vid} rolled back: {reason}")
        registry.end_canary("rolled_back", reason=reason, expected=vid)
        return {"canary": vid, "action": "rolled_back", "reason": reason}
    out = status(registry, store, rules, now=now)
    verdict = out["verdict"]
    out["action"], out["reason"] = "running", verdict["reason"]
    if verdict["decision"] == "promote":
        try:
            registry.end_canary("promoted", reason=f"canary: {verdict['reason']}", decision=verdict, expected=vid)
            out["action"] = "promoted"
        except RegistryError as exc:  # the file changed between the check and the promotion
            reason = f"promotion refused: {exc}"
            registry.end_canary("rolled_back", reason=reason, decision=verdict, expected=vid)
            out["action"], out["reason"] = "rolled_back", reason
    elif verdict["decision"] == "rollback":
        registry.end_canary("rolled_back", reason=f"canary: {verdict['reason']}", decision=verdict, expected=vid)
        out["action"] = "rolled_back"
    say(f"canary {vid}: {out['action']} ({out['reason']})")
    return out
