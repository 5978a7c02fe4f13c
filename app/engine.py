"""The app's engine: serves the registry's current GGUF, hot-swaps it, streams answers, logs turns.

The engine is also the ``ctx`` other tabs are built with (``app.versions_tab.build_versions_tab(ctx)``):

    ctx.config                 loop.config.Config (``ctx.config.app``, ``ctx.config.model``, ...)
    ctx.store                  loop.store.Store (thread-safe: one connection per thread)
    ctx.writer                 app.writer.StoreWriter: the same writes, group-committed
    ctx.registry               loop.registry.Registry
    ctx.load_llama(path)       -> llama_cpp.Llama for any GGUF (n_ctx from the config,
                               logits_all=False); raises app.generation.ModelLoadError. The caller
                               owns the object: llama.cpp contexts are not thread-safe, so guard it
                               with a lock of your own and close() it when done.
    ctx.load_chat_model(path)  -> app.generation.ChatModel: the same plus the GGUF's chat template,
                               ``.lock``, ``.prompt_tokens(messages)`` and ``.stream(...)``.
    GENERATE_CONCURRENCY_ID    use it as ``concurrency_id`` on Gradio events that generate, so
                               Gradio's queue runs one generation at a time across all tabs.

Hot-swap: each request stats the registry's ``current.json`` (one ``os.stat``; the JSON is read
only when it changed). When another version became current, the next request loads it and is
served by it; a stream already running keeps its own reference to the old model and finishes on
it; the old model is closed when its last stream ends. If the new version cannot be loaded, the
engine keeps answering with the model it has (and says so), or, with none, reports the model as
unavailable while the app stays up; it retries when the pointer or the file changes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.generation import ChatModel, ModelLoadError, Sampling, StreamStats, load_llama
from app.policy import clean_message, clean_system_prompt, dropped_notice, fit_history
from app.writer import StoreWriter
from loop import paths
from loop.config import Config, load_config
from loop.registry import Registry, RegistryError, sha256_file
from loop.store import Store

log = logging.getLogger(__name__)

GENERATE_CONCURRENCY_ID = "generate"


class ModelUnavailable(RuntimeError):
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


@dataclass
class TurnOutcome:
    turn_id: str
    answer: str
    version_id: str
    gguf_sha256: str
    finish_reason: str
    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    ttft_s: float | None
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    logprob_mean: float | None
    logprob_min: float | None
    decode_s: float
    dropped_turns: int


@dataclass
class Event:
    """What ``Engine.chat`` yields: "start" (the model is chosen), "delta" (new text), "done"."""

    kind: str
    text: str = ""
    version_id: str = ""
    notices: list[str] = field(default_factory=list)
    outcome: TurnOutcome | None = None
    conversation_id: str = ""


def _stat_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Engine:
    def __init__(
        self,
        config: Config | None = None,
        *,
        store: Store | None = None,
        registry: Registry | None = None,
        bootstrap: bool = True,
        verify_sha256: bool = True,
    ):
        self.config = config or load_config()
        self.store = store or Store.open(self.config.home)
        self.registry = registry or Registry(paths.registry_dir(self.config.home))
        self.verify_sha256 = verify_sha256
        # Turns and feedback go through one group-commit writer (see app/writer.py).
        self.writer = StoreWriter(self.store)
        self.mirror = None
        self.bootstrap_error: str | None = None
        self._swap_lock = threading.Lock()
        self._served: Served | None = None
        self._pointer_sig: Any = "unread"
        self._target: str | None = None
        self._pointer_error: str | None = None
        self._failed: tuple[str, Any] | None = None  # (version id, file signature) that failed to load
        self.load_error: str | None = None
        self._stops: dict[str, threading.Event] = {}
        if bootstrap:
            self._bootstrap()

    # -- setup -----------------------------------------------------------------------------------

    def _bootstrap(self) -> None:
        from loop.bootstrap import BootstrapError, ensure_base_version

        try:
            ensure_base_version(self.config, self.registry)
        except (BootstrapError, RegistryError, OSError) as exc:
            # The app still starts: it says what is wrong on every request instead of crashing.
            self.bootstrap_error = str(exc)
            log.error("bootstrap failed: %s", exc)

    def start_mirror(self, api: Any | None = None) -> Any:
        """Restore the store from its durable mirror, then keep mirroring in the background."""
        from loop.mirror import mirror_from_config

        self.mirror = mirror_from_config(self.config, self.store, api=api)
        if self.mirror is not None:
            try:
                self.mirror.restore()
            except Exception as exc:  # an unreachable mirror must not keep the chat down
                log.error("mirror restore from %s failed: %s", self.mirror.target.describe(), exc)
                self.mirror.last_error = str(exc)
            self.mirror.start(self.config.app.mirror_interval_s)
        return self.mirror

    def flush(self) -> None:
        """Wait until every turn logged so far is durable in the store."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()  # first: the mirror's last flush then includes the last turns
        if self.mirror is not None:
            self.mirror.stop()
        with self._swap_lock:
            served, self._served = self._served, None
        if served is not None and served.users == 0:
            served.model.close()

    # -- the ctx contract ------------------------------------------------------------------------

    def load_llama(self, path: str | Path) -> Any:
        return load_llama(path, n_ctx=self.config.model.n_ctx, n_threads=self.config.model.n_threads)

    def load_chat_model(self, path: str | Path, name: str = "") -> ChatModel:
        return ChatModel(self.load_llama(path), name=name or Path(path).name)

    # -- the served model and hot-swap -----------------------------------------------------------

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

    def _acquire(self) -> tuple[Served, list[str]]:
        with self._swap_lock:
            notices = self._refresh()
            served = self._served
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
            served, current = self._served, self._target
        return {
            "version": served.version_id if served else None,
            "gguf_sha256": served.gguf_sha256 if served else None,
            "current": current,
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

    # -- stop flags (the Stop button of each browser session) ------------------------------------

    def stop_flag(self, key: str) -> threading.Event:
        with self._swap_lock:
            return self._stops.setdefault(key, threading.Event())

    def request_stop(self, key: str) -> None:
        self.stop_flag(key).set()

    def forget_stop_flag(self, key: str) -> None:
        """The browser session ended (tab closed): its flag is no longer needed."""
        with self._swap_lock:
            self._stops.pop(key, None)

    # -- one chat turn ---------------------------------------------------------------------------

    def chat(
        self,
        *,
        conversation_id: str | None,
        history: list[dict[str, str]],
        user_message: str,
        system_prompt: str | None = None,
        sampling: Sampling | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Event]:
        """Answer ``user_message`` after ``history`` (user/assistant dicts), streaming; log the turn.

        ``conversation_id`` None starts a new conversation (its id is in the "start" event).

        Raises InputRejected (before any model work) or ModelUnavailable from the first ``next()``.
        The turn is logged even when the stream is stopped or abandoned part-way (finish_reason
        "stopped" / "abandoned"), because the user saw that partial answer.
        """
        t0 = time.perf_counter()
        message = clean_message(user_message, self.config.app.max_message_chars)
        system_prompt = clean_system_prompt(system_prompt, self.config.app.max_message_chars)
        sampling = dataclasses.replace(sampling or self.default_sampling())
        served, notices = self._acquire()
        if stop is not None:
            stop.clear()  # a Stop pressed after the previous answer ended must not cut this one
        parts: list[str] = []
        stats = StreamStats()
        ttft: float | None = None
        fitted = None
        logged = False
        try:
            with served.model.lock:
                fitted = fit_history(system_prompt, history, message, served.model.count_tokens,
                                     served.model.n_ctx, sampling.max_tokens)
                sampling.max_tokens = fitted.max_tokens
                if not conversation_id:  # created only for a message that is going to be answered
                    conversation_id = self.writer.new_conversation(client="app")
                if fitted.dropped_turns:
                    notices.append(dropped_notice(fitted.dropped_turns, served.model.n_ctx))
                yield Event("start", version_id=served.version_id, notices=notices, conversation_id=conversation_id)
                tokens = served.model.prompt_tokens(fitted.messages)
                for step in served.model.stream(tokens, sampling, stats, stop):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(step.text)
                    if step.text:
                        yield Event("delta", text=step.text, version_id=served.version_id)
            outcome = self._log(served, conversation_id, fitted, sampling, stats, parts, ttft, t0)
            logged = True
            yield Event("done", text=outcome.answer, version_id=served.version_id, outcome=outcome)
        except GeneratorExit:
            stats.finish_reason = "abandoned"  # the consumer went away mid-stream
            raise
        except Exception:
            stats.finish_reason = "error"
            raise
        finally:
            if not logged and fitted is not None and stats.finish_reason in ("abandoned", "error"):
                try:
                    self._log(served, conversation_id, fitted, sampling, stats, parts, ttft, t0)
                except Exception as exc:  # never mask the original problem
                    log.error("could not log an interrupted turn: %s", exc)
            self._release(served)
            if stop is not None:
                stop.clear()

    def _log(self, served, conversation_id, fitted, sampling, stats, parts, ttft, t0) -> TurnOutcome:
        answer = "".join(parts).strip()
        latency = time.perf_counter() - t0
        sampling_log = {**sampling.as_dict(), "finish_reason": stats.finish_reason}
        turn_id = self.writer.log_turn(
            conversation_id=conversation_id,
            messages=fitted.messages,
            answer=answer,
            model_version=served.version_id,
            gguf_sha256=served.gguf_sha256,
            sampling=sampling_log,
            latency_s=latency,
            ttft_s=ttft,
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            logprob_mean=stats.logprob_mean,
            logprob_min=stats.logprob_min,
        )
        return TurnOutcome(turn_id, answer, served.version_id, served.gguf_sha256, stats.finish_reason,
                           fitted.messages, sampling_log, ttft, latency, stats.prompt_tokens,
                           stats.completion_tokens, stats.logprob_mean, stats.logprob_min, stats.decode_s,
                           fitted.dropped_turns)

    def default_sampling(self) -> Sampling:
        app = self.config.app
        return Sampling(temperature=app.temperature, top_p=app.top_p, max_tokens=app.max_tokens)
