"""The app's engine: serves the registry's current GGUF, hot-swaps it, streams answers, logs turns.

The engine is also the ``ctx`` other tabs are built with (``app.versions_tab.build_versions_tab(ctx)``):

    ctx.config                 loop.core.config.CoreConfig (``ctx.config.app``, ``ctx.config.model``, ...)
    ctx.store                  loop.core.store.Store (thread-safe: one connection per thread)
    ctx.writer                 app.writer.StoreWriter: the same writes, group-committed
    ctx.registry               loop.core.registry.Registry
    ctx.load_chat_model(path)  -> app.generation.ChatModel for any GGUF (a ``loop.core.gguf_model.GgufModel``,
                               n_ctx and threads from the config): its chat template, ``.lock`` (hold it
                               to decode: llama.cpp contexts are not thread-safe), ``.prompt_tokens(messages)``,
                               ``.decode(...)``, ``.stream(...)`` and the ``llama_cpp.Llama`` as ``.llama``.
                               Raises ``loop.core.gguf_model.ModelLoadError``; the caller owns the
                               object and close()s it when done.
    GENERATE_CONCURRENCY_ID    use it as ``concurrency_id`` on Gradio events that generate, so
                               Gradio's queue runs one generation at a time across all tabs.

Modules: this one holds the Engine, the ctx contract and the chat turns; the served models (hot-swap,
canary, ``status``, ``warm_up``) are ``app.serving.ServedModels``, a base class of Engine, and
``ModelUnavailable`` (importable from here) is defined there.

Hot-swap: each request stats the registry's ``current.json`` (one ``os.stat``; the JSON is read
only when it changed). When another version became current, the next request loads it and is
served by it; a stream already running keeps its own reference to the old model and finishes on
it; the old model is closed when its last stream ends. If the new version cannot be loaded, the
engine keeps answering with the model it has (and says so), or, with none, reports the model as
unavailable while the app stays up; it retries when the pointer or the file changes.

Canary (``[rollout] canary_share``, docs/rollout.md): while the registry's ``canary.json`` names a
version, it is loaded beside the current one and answers the new conversations that
``loop.core.registry.canary_arm`` assigns to it (a hash of the conversation id), for the whole
conversation; a conversation begun on the current version stays there. Such a new conversation's
id is taken before the model is chosen, since the id decides. A canary that cannot be loaded (its
GGUF missing or changed) is rolled back in the registry with the reason logged, and its
conversations are answered by the current version.

Turns: the "done" event carries a turn id only once the turn is durable (``app.writer``), so
feedback on it can never meet "no turn", even after a crash. Shutdown (``close``) refuses new
chats, stops every running stream and logs each one's partial answer (finish_reason "shutdown"),
also for a stream whose consumer went away without closing it, before the writer is closed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.generation import ChatModel, Sampling, StreamStats
from app.policy import clean_message, clean_system_prompt, dropped_notice, fit_history
from app.serving import ModelUnavailable, Served, ServedModels, _stat_signature
from app.writer import StoreWriter, WriteFailed, WriterClosed, WriteTimeout
from loop.core import paths
from loop.core.config import CoreConfig, load_config
from loop.core.registry import Registry, RegistryError
from loop.core.store import Store

log = logging.getLogger(__name__)

GENERATE_CONCURRENCY_ID = "generate"


@dataclass
class TurnOutcome:
    turn_id: str | None  # None: the turn could not be saved (``save_error`` says why); no feedback on it
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
    save_error: str | None = None


@dataclass
class Event:
    """What ``Engine.chat`` yields: "start" (the model is chosen), "delta" (new text), "done"."""

    kind: str
    text: str = ""
    version_id: str = ""
    notices: list[str] = field(default_factory=list)
    outcome: TurnOutcome | None = None
    conversation_id: str = ""


@dataclass
class _InFlight:
    """One chat stream between its "start" and its logged turn; ``Engine.close`` finishes it."""

    served: Served
    conversation_id: str
    fitted: Any
    sampling: Sampling
    stats: StreamStats
    t0: float
    stop: threading.Event
    parts: list[str] = field(default_factory=list)
    ttft: float | None = None
    suspended: bool = False  # at a yield: the consumer holds it, no code of ours is running
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcome: TurnOutcome | None = None
    logged: bool = False


class Engine(ServedModels):
    def __init__(
        self,
        config: CoreConfig | None = None,
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
        self._init_serving()
        self._stops: dict[str, threading.Event] = {}
        self._inflight_by_id: dict[int, _InFlight] = {}
        self._closing = False
        if bootstrap:
            self._bootstrap()

    # -- setup -----------------------------------------------------------------------------------

    def _bootstrap(self) -> None:
        from loop.core.bootstrap import BootstrapError, ensure_base_version

        try:
            ensure_base_version(self.config, self.registry)
        except (BootstrapError, RegistryError, OSError) as exc:
            # The app still starts: it says what is wrong on every request instead of crashing.
            self.bootstrap_error = str(exc)
            log.error("bootstrap failed: %s", exc)

    def start_mirror(self, api: Any | None = None) -> Any:
        """Restore the store from its durable mirror, then keep mirroring in the background."""
        from loop.core.mirror import mirror_from_config

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

    def close(self, drain_timeout: float = 5.0) -> None:
        """Stop serving without losing a turn: refuse new chats, stop the running streams, log
        each one's answer so far, then close the writer (so the mirror's last flush has them)."""
        with self._swap_lock:
            already, self._closing = self._closing, True
            streams = list(self._inflight_by_id.values())
        if already:
            return
        for f in streams:
            f.stop.set()
        # A stream that is generating stops after its next token and logs itself; one parked at a
        # yield (its consumer went away) never resumes, so it is logged here instead.
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and any(not f.logged and not f.suspended for f in streams):
            time.sleep(0.01)
        for f in streams:
            if not f.logged:
                try:
                    self._log(f, finish_reason="shutdown")
                except Exception as exc:
                    log.error("could not log a stream running at shutdown: %s", exc)
        self.writer.close()  # before the mirror: its last flush then includes the last turns
        if self.mirror is not None:
            self.mirror.stop()
        with self._swap_lock:
            served, self._served = self._served, None
            self._retire_canary()
        if served is not None and served.users == 0:
            served.model.close()

    # -- the ctx contract ------------------------------------------------------------------------

    def load_chat_model(self, path: str | Path, name: str = "") -> ChatModel:
        return ChatModel.load(path, n_ctx=self.config.model.n_ctx, n_threads=self.config.model.n_threads,
                              name=name or Path(path).name)

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
        new = not conversation_id
        if new and _stat_signature(self.registry.canary_file) is not None:
            conversation_id = self.writer.new_conversation(client="app")  # its id picks the version
        served, notices = self._acquire(conversation_id, new)
        if stop is None:
            stop = threading.Event()  # close() must be able to stop this stream too
        stop.clear()  # a Stop pressed after the previous answer ended must not cut this one
        stats = StreamStats()
        flight: _InFlight | None = None
        try:
            with served.model.lock:
                fitted = fit_history(system_prompt, history, message, served.model.count_tokens,
                                     served.model.n_ctx, sampling.max_tokens)
                sampling.max_tokens = fitted.max_tokens
                if not conversation_id:  # created only for a message that is going to be answered
                    conversation_id = self.writer.new_conversation(client="app")
                if fitted.dropped_turns:
                    notices.append(dropped_notice(fitted.dropped_turns, served.model.n_ctx))
                flight = _InFlight(served, conversation_id, fitted, sampling, stats, t0, stop)
                with self._swap_lock:
                    if self._closing:
                        raise ModelUnavailable("The app is shutting down; please try again in a moment.")
                    self._inflight_by_id[id(flight)] = flight
                yield from self._parked(flight, Event("start", version_id=served.version_id, notices=notices,
                                                      conversation_id=conversation_id))
                tokens = served.model.prompt_tokens(fitted.messages)
                for step in served.model.stream(tokens, sampling, stats, stop):
                    if flight.ttft is None:
                        flight.ttft = time.perf_counter() - t0
                    flight.parts.append(step.text)
                    if step.text:
                        yield from self._parked(flight, Event("delta", text=step.text, version_id=served.version_id))
            outcome = self._log(flight)
            yield Event("done", text=outcome.answer, version_id=served.version_id, outcome=outcome)
        except GeneratorExit:
            stats.finish_reason = "abandoned"  # the consumer went away mid-stream
            raise
        except Exception:
            stats.finish_reason = "error"
            raise
        finally:
            if flight is not None:
                if not flight.logged:  # abandoned, or an error after the user saw part of the answer
                    try:
                        self._log(flight)
                    except Exception as exc:  # never mask the original problem
                        log.error("could not log an interrupted turn: %s", exc)
                with self._swap_lock:
                    self._inflight_by_id.pop(id(flight), None)
            self._release(served)
            stop.clear()

    @staticmethod
    def _parked(flight: _InFlight, event: Event) -> Iterator[Event]:
        flight.suspended = True
        try:
            yield event
        finally:
            flight.suspended = False

    def _log(self, flight: _InFlight, finish_reason: str | None = None) -> TurnOutcome:
        """Log ``flight``'s turn once (whoever comes first: the stream itself or ``close``) and
        wait until it is durable; a turn that cannot be saved gets no id and says why."""
        with flight.lock:
            if flight.outcome is not None:
                return flight.outcome
            flight.logged = True
            served, fitted, sampling, stats = flight.served, flight.fitted, flight.sampling, flight.stats
            reason = finish_reason or stats.finish_reason
            if reason == "stopped" and self._closing:
                reason = "shutdown"
            answer = "".join(list(flight.parts)).strip()
            latency = time.perf_counter() - flight.t0
            sampling_log = {**sampling.as_dict(), "finish_reason": reason}
            turn_id, save_error = None, None
            try:
                turn_id = self.writer.log_turn(
                    conversation_id=flight.conversation_id,
                    messages=fitted.messages,
                    answer=answer,
                    model_version=served.version_id,
                    gguf_sha256=served.gguf_sha256,
                    sampling=sampling_log,
                    latency_s=latency,
                    ttft_s=flight.ttft,
                    prompt_tokens=stats.prompt_tokens,
                    completion_tokens=stats.completion_tokens,
                    logprob_mean=stats.logprob_mean,
                    logprob_min=stats.logprob_min,
                )
            except (WriteFailed, WriteTimeout, WriterClosed) as exc:
                log.error("turn not saved: %s", exc)
                save_error = f"This answer could not be saved ({exc}), so it cannot take feedback."
            flight.outcome = TurnOutcome(turn_id, answer, served.version_id, served.gguf_sha256, reason,
                                         fitted.messages, sampling_log, flight.ttft, latency, stats.prompt_tokens,
                                         stats.completion_tokens, stats.logprob_mean, stats.logprob_min,
                                         stats.decode_s, fitted.dropped_turns, save_error)
            return flight.outcome

    def conversation_history(self, conversation_id: str) -> list[dict[str, str]]:
        """The finished exchanges of a logged conversation, as the model sees them next
        (KeyError when the store has no such conversation)."""
        turns = self.store.conversation_turns(conversation_id)
        if not turns:
            raise KeyError(f"no conversation with id {conversation_id!r}")
        out: list[dict[str, str]] = []
        for t in turns:
            user = next((m["content"] for m in reversed(t["messages"]) if m["role"] == "user"), "")
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": t["answer"]}]
        return out

    def default_sampling(self) -> Sampling:
        app = self.config.app
        return Sampling(temperature=app.temperature, top_p=app.top_p, max_tokens=app.max_tokens)
