"""The models the app serves: the registry's current version, hot-swapped, and the canary beside it.

Contract: ``ServedModels`` is a base class of ``app.engine.Engine`` (one object: the Engine's lock and
state are these). Its host provides ``self.config``, ``self.registry``, ``self.writer``,
``self.verify_sha256``, ``self.bootstrap_error``, ``self._closing``, ``self.store`` and
``load_chat_model(path, name)``, and calls ``_init_serving()`` in its ``__init__``.

- ``_acquire(conversation_id, new)`` -> (Served, notices): under ``_swap_lock``, follows ``current.json`` and
  ``canary.json`` (one ``os.stat`` each when unchanged), picks the canary for a conversation in its arm, counts
  one user of the model; ModelUnavailable when none can answer (or the app is closing). ``_release(served)``
  ends that use and closes a swapped-out model when its last stream ends.
- A version that cannot be loaded keeps the model in service (with a notice) and is retried only when its
  file changes; a canary that cannot be loaded is rolled back in the registry with the reason.
- ``status()``: what the header shows; ``warm_up()``: load now and run one token.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.generation import ChatModel, Sampling, StreamStats
from loop.core.errors import LoopError
from loop.core.gguf_model import ModelLoadError
from loop.core.io import sha256_file
from loop.core.registry import RegistryError, canary_arm

log = logging.getLogger(__name__)


class ModelUnavailable(LoopError, RuntimeError):
    """No model can answer right now; the message is shown to the user as is."""


@dataclass
class Served:
    """A loaded version; ``users`` counts the streams running on it."""

    version_id: str
    gguf_path: Path
    gguf_sha256: str
    model: ChatModel
    users: int = 0
    retired: bool = False


def _stat_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ServedModels:
    """The served model and the canary of an Engine (module docstring)."""

    def _init_serving(self) -> None:
        self._swap_lock = threading.Lock()
        self._served: Served | None = None
        self._pointer_sig: Any = "unread"
        self._target: str | None = None
        self._pointer_error: str | None = None
        self._failed: tuple[str, Any] | None = None  # (version id, file signature) that failed to load
        self._canary: Served | None = None
        self._canary_sig: Any = "unread"
        self._canary_pointer: dict[str, Any] | None = None
        self.load_error: str | None = None

    def _load_version(self, vid: str) -> Served:
        version = self.registry.get(vid)
        path = version.gguf_path
        if not path.is_file():
            raise ModelLoadError(f"version {vid}: model file not found: {path}")
        if self.verify_sha256 and version.gguf_sha256 and sha256_file(path) != version.gguf_sha256:
            raise ModelLoadError(f"version {vid}: the GGUF on disk does not match its registered sha256")
        model = self.load_chat_model(path, name=vid)
        return Served(vid, path, version.gguf_sha256, model)

    def _refresh(self) -> list[str]:
        """Make the served model follow the registry pointer; returns notices for the user.

        Called under ``_swap_lock`` on every request: one ``os.stat`` when nothing changed.
        """
        sig = _stat_signature(self.registry.current_file)
        if sig != self._pointer_sig:
            self._pointer_sig = sig
            try:
                self._target, self._pointer_error = self.registry.current_id(), None
            except (RegistryError, OSError) as exc:  # a damaged pointer: say so, keep serving what is loaded
                self._target, self._pointer_error = None, f"the registry pointer cannot be read: {exc}"
        target, served = self._target, self._served
        if target is None:
            self.load_error = self._pointer_error or self.bootstrap_error or "no model version is current in the registry"
        elif served is not None and served.version_id == target:
            self.load_error = None
            return []
        else:
            try:
                file_sig = _stat_signature(self.registry.get(target).gguf_path)
            except RegistryError:
                file_sig = None
            # Retry a failed version only when its file changed: not a full load per request.
            if self._failed != (target, file_sig):
                try:
                    new = self._load_version(target)
                except (ModelLoadError, RegistryError) as exc:
                    self._failed, self.load_error = (target, file_sig), str(exc)
                    log.error("cannot serve %s: %s", target, exc)
                else:
                    self._served, self._failed, self.load_error = new, None, None
                    log.info("now serving %s (%s)", target, new.gguf_path)
                    if served is not None:
                        served.retired = True
                        if served.users == 0:
                            served.model.close()
                    return []
        if served is not None:
            return [f"Version {target or '(none)'} is current but cannot be served ({self.load_error}); "
                    f"answering with {served.version_id} meanwhile."]
        return []

    def _retire_canary(self) -> None:
        canary, self._canary = self._canary, None
        if canary is not None:
            canary.retired = True
            if canary.users == 0:
                canary.model.close()

    def _refresh_canary(self) -> dict[str, Any] | None:
        """Follow ``canary.json`` (one ``os.stat`` when unchanged); the pointer while a loaded canary
        can answer, else None. Called under ``_swap_lock`` after ``_refresh``."""
        sig = _stat_signature(self.registry.canary_file)
        if sig != self._canary_sig:
            self._canary_sig = sig
            try:
                self._canary_pointer = self.registry.canary_pointer()
            except (RegistryError, OSError) as exc:  # damaged: everyone gets the current version
                log.error("the canary pointer cannot be read (%s); the current version answers everyone", exc)
                self._canary_pointer = None
        pointer = self._canary_pointer
        if pointer is None or pointer["version"] == self._target:
            self._retire_canary()
            return None
        if self._canary is not None and self._canary.version_id == pointer["version"]:
            return pointer
        self._retire_canary()
        try:
            self._canary = self._load_version(pointer["version"])
        except (ModelLoadError, RegistryError) as exc:
            reason = f"the canary cannot be served: {exc}"
            log.error("rolling back canary %s: %s", pointer["version"], reason)
            self._canary_pointer = None  # not retried per request; a new canary.json is read again
            try:
                self.registry.end_canary("rolled_back", reason=reason, expected=pointer["version"])
            except RegistryError as end_exc:
                log.error("could not roll back canary %s: %s", pointer["version"], end_exc)
            return None
        log.info("canary %s loaded (%s of new conversations)", pointer["version"], pointer.get("share"))
        return pointer

    def _to_canary(self, conversation_id: str | None, new: bool, pointer: dict[str, Any]) -> bool:
        """A new conversation in the canary's share, or one whose last turn the canary wrote."""
        if not conversation_id or not canary_arm(conversation_id, pointer):
            return False
        if new:
            return True
        row = self.store._conn().execute(
            "SELECT model_version FROM turns WHERE conversation_id = ? ORDER BY position DESC LIMIT 1",
            (conversation_id,)).fetchone()
        return row is not None and row[0] == pointer["version"]

    def _acquire(self, conversation_id: str | None = None, new: bool = False) -> tuple[Served, list[str]]:
        with self._swap_lock:
            if self._closing:
                raise ModelUnavailable("The app is shutting down; please try again in a moment.")
            notices = self._refresh()
            served = self._served
            pointer = self._refresh_canary() if served is not None else None
            if pointer is not None and self._to_canary(conversation_id, new, pointer):
                served = self._canary
            if served is None:
                raise ModelUnavailable(f"The model is unavailable: {self.load_error or 'not loaded'}. "
                                       "The app keeps running; it will answer once a loadable version is current.")
            served.users += 1
            return served, notices

    def _release(self, served: Served) -> None:
        with self._swap_lock:
            served.users -= 1
            if served.retired and served.users == 0:
                served.model.close()  # the last stream on a swapped-out model has ended

    def status(self) -> dict[str, Any]:
        """What the app shows in its header: the serving version, or why there is none."""
        with self._swap_lock:
            notices = self._refresh()
            canary = self._refresh_canary() if self._served is not None else None
            served, current = self._served, self._target
        health = self.writer.health()
        if health["fallback_rows"]:
            notices.append(f"The store failed ({health['error']}); {health['fallback_rows']} rows are kept in a "
                           "fallback file and are written to the store on the next start.")
        return {
            "version": served.version_id if served else None,
            "gguf_sha256": served.gguf_sha256 if served else None,
            "current": current,
            "canary": canary["version"] if canary else None,
            "error": self.load_error,
            "notices": notices,
        }

    def warm_up(self, generate: bool = True) -> None:
        """Load the current model now and (``generate``) run one token through it, so that the
        first user waits neither for the load nor for llama.cpp's first-use costs (paging the
        weights in, allocating compute buffers)."""
        self.status()
        if not generate:
            return
        try:
            served, _ = self._acquire()
        except ModelUnavailable:
            return
        try:
            with served.model.lock:
                tokens = served.model.prompt_tokens([{"role": "user", "content": "Hi"}])
                for _ in served.model.stream(tokens, Sampling(temperature=0.0, max_tokens=1, seed=0), StreamStats()):
                    pass
        finally:
            self._release(served)
