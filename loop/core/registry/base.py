"""The registry's versions, its ``current`` pointer and retention (``loop.core.registry`` has the layout
and the crash-safety contract; the canary pointer is added by ``Registry``)."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loop.core import paths
from loop.core.io import atomic_write_text, fsync_path, read_jsonl, sha256_file, utcnow
from loop.core.registry.version import RegistryCorruptError, RegistryError, Version, check_version_id, is_version_id

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RegistryBase:
    """Versions, the current pointer and retention; ``Registry`` is this plus the canary pointer."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else paths.registry_dir()
        self.versions_dir = paths.private_dir(self.root / "versions")
        self.current_file = self.root / "current.json"
        self.history_file = self.root / "history.jsonl"
        self.pruned_file = self.root / "pruned.jsonl"
        self.canary_file = self.root / "canary.json"
        self.canary_log_file = self.root / "canary.jsonl"
        self.lock_file = self.root / ".lock"
        self._thread_lock = threading.RLock()
        self._lock_depth = 0

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise writers across processes (cycle, CLI, app) and threads: a rollback typed while a
        cycle promotes must not interleave their pointer and history writes. Re-entrant."""
        with self._thread_lock:
            self._lock_depth += 1
            try:
                if self._lock_depth > 1:
                    yield
                    return
                with open(self.lock_file, "a") as fh:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # the OS drops it if the process dies
                    yield
            finally:
                self._lock_depth -= 1

    # -- versions ------------------------------------------------------------------------------

    def _next_id(self) -> str:
        # Pruned ids count too: an id names one model forever (history, arena votes, published files).
        numbers = [int(p.name[1:]) for p in self.versions_dir.iterdir() if is_version_id(p.name)]
        numbers += [int(vid[1:]) for vid in self.pruned_ids()]
        return f"v{max(numbers, default=0) + 1}"

    def register(
        self,
        gguf: str | Path,
        *,
        base_model: str,
        parent: str | None = None,
        quantization: str = "",
        variant: dict[str, Any] | None = None,
        snapshot_hash: str | None = None,
        snapshot_counts: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        verification: dict[str, Any] | None = None,
        hf_dir: str | Path | None = None,
        extra_files: list[str | Path] | None = None,
        note: str = "",
        link: bool = False,
    ) -> Version:
        """Copy (or hard-link) a GGUF into a new version directory and describe it."""
        gguf = Path(gguf)
        if not gguf.is_file():
            raise RegistryError(f"no GGUF at {gguf}")
        # Build under a name unique to this process and thread (list() ignores dot-names), then take
        # the id and rename under the registry lock: the copy (slow for 1B-class files) holds no lock,
        # and two writers can never race for the same id.
        tmp = self.versions_dir / f".new.partial-{os.getpid()}-{threading.get_ident()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        target = tmp / "model.gguf"
        # copyfile, not copy2: a copy gets the process's private mode (loop.core.paths), not the source's.
        # A hard link shares its source's inode and mode; only the base model as shipped is linked.
        if link:
            try:
                os.link(gguf, target)
            except OSError:
                shutil.copyfile(gguf, target)
        else:
            shutil.copyfile(gguf, target)
        for extra in extra_files or []:
            extra = Path(extra)
            if extra.is_file():
                shutil.copyfile(extra, tmp / extra.name)
        sha, size = sha256_file(target), target.stat().st_size
        with self._lock():
            vid = self._next_id()
            version = Version(
                id=vid,
                parent=parent,
                created_at=utcnow(),
                base_model=base_model,
                gguf_sha256=sha,
                size_bytes=size,
                quantization=quantization,
                variant=variant or {},
                snapshot_hash=snapshot_hash,
                snapshot_counts=snapshot_counts or {},
                metrics=metrics or {},
                verification=verification or {},
                hf_dir=str(hf_dir) if hf_dir else None,
                note=note,
            )
            atomic_write_text(tmp / "version.json", json.dumps(version.to_json(), indent=2, sort_keys=True))
            fsync_path(target)
            os.replace(tmp, self.versions_dir / vid)  # the version appears whole or not at all
            fsync_path(self.versions_dir)
        version.path = str(self.versions_dir / vid)
        return version

    def get(self, vid: str) -> Version:
        check_version_id(vid)
        vdir = self.versions_dir / vid
        meta = vdir / "version.json"
        if not meta.is_file():
            raise RegistryError(f"no version {vid!r} (known: {', '.join(v.id for v in self.list()) or 'none'})")
        try:
            data = json.loads(meta.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            known = {f.name for f in dataclasses.fields(Version)}
            version = Version(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError) as exc:  # unreadable, not JSON, wrong shape, missing fields
            raise RegistryCorruptError(f"{meta} is damaged ({exc}); version {vid} cannot be used until it is "
                                       "restored from a backup") from exc
        if version.id != vid:
            raise RegistryCorruptError(f"{meta} describes {version.id!r}, not {vid!r}")
        version.path = str(vdir)
        return version

    def list(self) -> list[Version]:
        """Every readable version, oldest first; a damaged one is left out with a logged warning."""
        out = []
        for vid in self._version_dirs():
            try:
                out.append(self.get(vid))
            except RegistryCorruptError as exc:
                log.warning("%s", exc)
        return sorted(out, key=lambda v: int(v.id[1:]))

    def _version_dirs(self) -> builtins.list[str]:
        return [p.name for p in self.versions_dir.iterdir()
                if is_version_id(p.name) and p.is_dir() and (p / "version.json").is_file()]

    def update(self, vid: str, **changes: Any) -> Version:
        with self._lock():  # read-modify-write: a concurrent pin must not undo a metrics update
            version = self.get(vid)
            for key, value in changes.items():
                if key in ("id", "path", "gguf_sha256"):
                    raise RegistryError(f"{key} cannot be changed")
                setattr(version, key, value)
            atomic_write_text(Path(version.path) / "version.json", json.dumps(version.to_json(), indent=2, sort_keys=True))
            return version

    def pin(self, vid: str, pinned: bool = True) -> Version:
        return self.update(vid, pinned=pinned)

    def taint(self, vid: str, reason: str, turn_ids: builtins.list[str], at: str | None = None) -> Version:
        """Mark ``vid`` as trained on forgotten text (``python -m loop.store forget``); appends one entry."""
        with self._lock():
            version = self.get(vid)
            entry = {"at": at or utcnow(), "reason": reason, "turn_ids": sorted(turn_ids)}
            return self.update(vid, tainted=[*version.tainted, entry])

    # -- the current pointer -------------------------------------------------------------------

    def pointer(self) -> dict[str, Any] | None:
        """The parsed ``current.json``; None when nothing was ever promoted.

        Raises RegistryCorruptError when the file cannot be read or is not a pointer (not JSON, not
        an object, or a ``version``/``previous`` that is not a version id)."""
        try:
            raw = self.current_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryCorruptError(f"{self.current_file} cannot be read: {exc}") from exc
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            check_version_id(data.get("version"))
            if data.get("previous") is not None:
                check_version_id(data["previous"])
        except ValueError as exc:  # also JSONDecodeError, UnicodeDecodeError, InvalidVersionIdError
            raise RegistryCorruptError(
                f"{self.current_file} is damaged ({exc}); repair it by naming the version to serve: "
                "python -m loop.versions rollback --to ID (ids: python -m loop.versions list)"
            ) from exc
        return data

    def current(self) -> Version | None:
        pointer = self.pointer()
        return self.get(pointer["version"]) if pointer else None

    def current_id(self) -> str | None:
        pointer = self.pointer()
        return pointer["version"] if pointer else None

    def history(self) -> builtins.list[dict[str, Any]]:
        # A torn last line from a crash mid-append is skipped: the pointer is the truth.
        return read_jsonl(self.history_file, missing_ok=True, skip_torn=True)

    def _append_history(self, entry: dict[str, Any]) -> None:
        with open(self.history_file, "ab+") as f:
            # A crash mid-append leaves a torn last line without its newline; start on a fresh line,
            # or this entry would be glued to the torn one and lost with it.
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(entry, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def reconcile(self) -> bool:
        """Repair what an interrupted write left behind; True when the history needed a line.

        A crash between the pointer and its history line gets the missing line ("recovered"), and
        leftovers of dead writers (half-built version dirs, temp pointers, half-deleted versions)
        are removed: they are invisible to list() but hold disk space.
        """
        with self._lock():
            self._remove_leftovers()
            pointer = self.pointer()
            if pointer is None:
                return False
            hist = self.history()
            if hist and hist[-1].get("to") == pointer["version"]:
                return False
            self._append_history(
                {"at": utcnow(), "action": "recovered", "from": pointer.get("previous"), "to": pointer["version"],
                 "reason": "pointer found newer than history after an interrupted promotion", "decision": {}}
            )
            return True

    def _remove_leftovers(self) -> None:
        def owner_dead(name: str) -> bool:
            pid = name.rsplit("-", 2)[-2] if name.count("-") >= 2 else ""
            return not (pid.isdigit() and _pid_alive(int(pid)))

        for p in self.versions_dir.iterdir():
            if p.name.startswith(".") and (p.name.endswith(".deleting") or (".partial-" in p.name and owner_dead(p.name))):
                shutil.rmtree(p, ignore_errors=True)
        for p in list(self.root.glob(".*.tmp-*")) + list(self.versions_dir.glob("v*/.*.tmp-*")):
            if owner_dead(p.name):
                p.unlink(missing_ok=True)

    def _check_servable(self, vid: str, force: bool = False) -> Version:
        version = self.get(vid)
        if not force and version.verification and not version.verification.get("passed", False):
            # Checked here, not only in promote(): a rollback must not serve a file the gate refused.
            raise RegistryError(f"version {vid} failed verification and cannot be served: "
                                f"{'; '.join(version.verification.get('reasons', [])) or 'no reason recorded'}")
        if not version.gguf_path.is_file():
            raise RegistryError(f"version {vid} has no GGUF file at {version.gguf_path}")
        if sha256_file(version.gguf_path) != version.gguf_sha256:
            raise RegistryError(f"version {vid}: GGUF sha256 does not match version.json (file changed on disk)")
        return version

    def _set_current(self, vid: str, *, action: str, reason: str, decision: dict[str, Any] | None,
                     force: bool = False, replace_damaged: bool = False) -> dict[str, Any]:
        with self._lock():
            self._check_servable(vid, force)
            if replace_damaged:
                self._remove_leftovers()
                previous = None
                kept = self.current_file.with_name(f"{self.current_file.name}.damaged-{utcnow().replace(':', '')}")
                shutil.copyfile(self.current_file, kept)  # what was there is evidence: keep it
                decision = dict(decision or {}, replaced_damaged_pointer=kept.name)
            else:
                self.reconcile()
                previous = self.current_id()
            pointer = {"version": vid, "previous": previous, "since": utcnow(), "reason": reason}
            atomic_write_text(self.current_file, json.dumps(pointer, sort_keys=True))
            entry = {"at": pointer["since"], "action": action, "from": previous, "to": vid, "reason": reason,
                     "decision": decision or {}}
            self._append_history(entry)
            return entry

    def promote(self, vid: str, *, reason: str, decision: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
        """Make ``vid`` current. Refuses a version whose verification did not pass unless forced."""
        return self._set_current(vid, action="promote", reason=reason, decision=decision, force=force)

    def rollback(self, to: str | None = None, *, reason: str = "manual rollback", force: bool = False) -> dict[str, Any]:
        """Point ``current`` back at ``to`` (default: the version before the current one).

        With ``to``, this also repairs a damaged ``current.json``."""
        if to is not None:
            check_version_id(to)
        with self._lock():
            try:
                pointer = self.pointer()
            except RegistryCorruptError:
                if to is None:
                    raise
                return self._set_current(to, action="rollback", reason=reason, decision={}, force=force,
                                         replace_damaged=True)
            if pointer is None:
                raise RegistryError("nothing is current: there is nothing to roll back")
            target = to or pointer.get("previous")
            if not target:
                raise RegistryError(f"{pointer['version']} has no previous version; name one with --to")
            if target == pointer["version"]:
                raise RegistryError(f"{target} is already current")
            return self._set_current(target, action="rollback", reason=reason, decision={}, force=force)

    # -- the canary pointer, read side (retention must not prune a running canary) -----------

    def canary_pointer(self) -> dict[str, Any] | None:
        """The parsed ``canary.json``; None when no canary runs. A damaged file raises
        RegistryCorruptError (repair: delete it, which ends the canary)."""
        try:
            raw = self.canary_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryCorruptError(f"{self.canary_file} cannot be read: {exc}") from exc
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            check_version_id(data.get("version"))
            share = data.get("share")
            if not isinstance(share, (int, float)) or not 0 <= share < 1:
                raise ValueError(f"share {share!r} is not in [0, 1)")
            dt.datetime.fromisoformat(str(data.get("since")))
        except ValueError as exc:
            raise RegistryCorruptError(f"{self.canary_file} is damaged ({exc}); delete it to end the canary "
                                       "(the current version then serves every conversation)") from exc
        return data

    def canary_id(self) -> str | None:
        pointer = self.canary_pointer()
        return pointer["version"] if pointer else None

    def canary_log(self) -> builtins.list[dict[str, Any]]:
        # A torn last line is skipped: the pointer is the truth.
        return read_jsonl(self.canary_log_file, missing_ok=True, skip_torn=True)

    # -- retention -------------------------------------------------------------------------------

    def prune(self, keep: int = 5, *, dry_run: bool = False) -> builtins.list[str]:
        """Delete old versions; never the current, the previous, a pinned one, or the newest ``keep``.

        Refuses (RegistryCorruptError) when ``current.json`` cannot be read: what is served is unknown."""
        with self._lock():
            pointer = self.pointer() or {}
            # Compared as resolved directories, not strings: no spelling of an id can unprotect it.
            protected = {(self.versions_dir / pointer[k]).resolve() for k in ("version", "previous") if pointer.get(k)}
            canary = self.canary_id()
            if canary:  # users are judging it: it is served, even if not current
                protected.add((self.versions_dir / canary).resolve())
            candidates = [v for v in self.list() if Path(v.path).resolve() not in protected and not v.pinned]
            doomed = candidates[: max(0, len(candidates) - keep)]
            if dry_run:
                return [v.id for v in doomed]
            removed = []
            for v in doomed:
                # Logged first so the id is never handed out again, even if we die mid-delete.
                with open(self.pruned_file, "a") as f:
                    f.write(json.dumps({"at": utcnow(), "version": v.id, "sha256": v.gguf_sha256}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                trash = self.versions_dir / f".{v.id}.deleting"
                os.replace(v.path, trash)  # vanish atomically from list(), then delete at leisure
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(v.id)
            return removed

    def pruned_ids(self) -> builtins.list[str]:
        if not self.pruned_file.is_file():
            return []
        out = []
        for line in self.pruned_file.read_text().splitlines():
            try:
                vid = json.loads(line)["version"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if is_version_id(vid):
                out.append(vid)
        return out
