"""``Registry``: the versions, the ``current`` pointer and retention (``RegistryBase``), plus the canary
pointer; and ``canary_arm``, the one routing rule for a running canary."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from loop.core.io import atomic_write_text, fsync_path, utcnow
from loop.core.registry.base import RegistryBase
from loop.core.registry.version import RegistryError


class Registry(RegistryBase):
    """Every version, the ``current`` pointer, and the canary a share of new conversations gets."""

    # -- the canary pointer --------------------------------------------------------------------

    def _append_canary_log(self, entry: dict[str, Any]) -> None:
        with open(self.canary_log_file, "a") as f:
            f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def start_canary(self, vid: str, *, share: float, reason: str, decision: dict[str, Any] | None = None,
                     force: bool = False) -> dict[str, Any]:
        """Serve ``vid`` to ``share`` of new conversations beside the current version.

        Checked like a promotion (verification passed, GGUF present and unchanged). Starting the
        canary that already runs returns its pointer (a resumed cycle starts nothing twice);
        another canary while one runs, or the current version as canary, is refused."""
        if not 0 < share < 1:
            raise RegistryError(f"a canary share must be in (0, 1), got {share}")
        with self._lock():
            running = self.canary_pointer()
            if running is not None:
                if running["version"] == vid:
                    return running
                raise RegistryError(f"canary {running['version']} is still running: end it before starting {vid}")
            self._check_servable(vid, force)
            current = self.current_id()
            if current == vid:
                raise RegistryError(f"{vid} is already current: it cannot be a canary")
            # Microseconds, like the store's turn times: a turn a moment before the start is not counted.
            since = utcnow("microseconds")
            pointer = {"version": vid, "baseline": current, "since": since, "share": float(share),
                       "reason": reason}
            atomic_write_text(self.canary_file, json.dumps(pointer, sort_keys=True))
            self._append_canary_log({"at": pointer["since"], "action": "start", "version": vid, "baseline": current,
                                     "share": float(share), "reason": reason, "decision": decision or {}})
            return pointer

    def end_canary(self, outcome: str, *, reason: str, decision: dict[str, Any] | None = None,
                   expected: str | None = None) -> dict[str, Any]:
        """End the running canary: ``promoted`` (made current through ``promote``) or ``rolled_back``
        (the current version serves everyone again). ``expected``: refuse if another canary runs.

        Crash safety: the promotion comes first and the pointer goes after it, so a crash between
        leaves a canary that is current, which the next check ends (``loop.rollout.check_canary``)."""
        if outcome not in ("promoted", "rolled_back"):
            raise RegistryError(f"a canary ends promoted or rolled_back, not {outcome!r}")
        with self._lock():
            pointer = self.canary_pointer()
            if pointer is None:
                raise RegistryError("no canary is running")
            vid = pointer["version"]
            if expected is not None and vid != expected:
                raise RegistryError(f"the running canary is {vid}, not {expected}")
            if outcome == "promoted" and self.current_id() != vid:
                self.promote(vid, reason=reason, decision={"canary": decision or {}})
            self.canary_file.unlink()
            fsync_path(self.root)
            entry = {"at": utcnow(), "action": outcome, "version": vid, "baseline": pointer.get("baseline"),
                     "since": pointer.get("since"), "share": pointer.get("share"), "reason": reason,
                     "decision": decision or {}}
            self._append_canary_log(entry)
            return entry


def canary_arm(conversation_id: str, pointer: dict[str, Any] | None) -> bool:
    """Whether ``conversation_id`` belongs to the canary described by ``pointer`` (``canary.json``).

    A hash of the canary's id and the conversation id, read as a number in [0, 1), below the share:
    the same conversation always gets the same answer while that canary runs, and each canary
    draws its own share of conversations (not always the same users)."""
    if not pointer or not conversation_id:
        return False
    digest = hashlib.sha256(f"{pointer['version']}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < float(pointer.get("share") or 0.0)
