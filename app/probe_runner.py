"""Run a GGUF on prompts through llama-cpp-python (greedily, or sampled): answers, mean logprob, timing.

Used by ``python -m loop.versions compare``, the fixed measures and the cycle's self-replay
(``loop.version_measures``, ``loop.cycle_stages``) and by the app's Versions tab (greedy side-by-side
answers, and sampled answers in the blind arena, so that the arena's answers cannot be matched to
the side-by-side view's). Every answer comes from a ``loop.core.gguf_model.GgufModel``: the app's chat
tokenises and decodes through the same object, so a prompt's text is never read as special tokens
and the arena sees the token ids users' chats see. Greedy is exactly argmax (no sampler chain in
between); each chosen token's logprob comes from the last row of logits. Each answer evaluates its
prompt afresh, so it never depends on what the model was asked before. :func:`greedy_answers` gives
the answers :func:`greedy_answer` gives (up to float rounding) to many chats at once, decoded side
by side (``GgufModel.greedy_batch``): the cycle's self-replay answers its general prompts with it.

Generation holds the model's own lock (a llama.cpp context is not thread-safe); the app's Versions
tab runs its generations in the chat's one-at-a-time queue, so on a small CPU they never slow each other.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loop.core.gguf_model import BATCH_WIDTH, Decoded, GgufModel, argmax
from loop.core.probes import FALLBACK_PROBES, as_messages, last_user_text, load_probes, probes_file

# The probe set is the core's (``loop.core.probes``); it is named here too so that callers that run
# probes find the set and the runner in one place.
__all__ = [
    "FALLBACK_PROBES", "LlamaCache", "ProbeAnswer", "ProbeRun", "as_messages", "greedy_answer",
    "greedy_answers", "last_user_text", "load_probes", "probes_file", "run_probes", "sampled_answer",
]


@dataclass
class ProbeAnswer:
    prompt: str
    answer: str
    n_tokens: int
    mean_logprob: float | None  # mean log p of each chosen token, the end-of-turn token included
    seconds: float
    finished: bool  # ended on an end-of-generation token rather than the token limit
    seed: int | None = None  # the sampling seed; None for a greedy answer


def greedy_answer(model: GgufModel, messages: list[dict[str, str]], max_tokens: int = 64) -> ProbeAnswer:
    """Decode greedily (argmax) from the chat-templated messages."""
    return sampled_answer(model, messages, max_tokens=max_tokens, temperature=0.0)


def greedy_answers(model: GgufModel, conversations: Sequence[list[dict[str, str]]], max_tokens: int = 64, *,
                   width: int = BATCH_WIDTH) -> list[ProbeAnswer]:
    """:func:`greedy_answer` for every conversation, in order, decoded side by side in one pass
    (``GgufModel.greedy_batch``, ``width`` sequences at once): the same answers up to float rounding, in
    less time. An answer's ``seconds`` is an equal share of the pass's wall time, so that the answers'
    seconds add up to it."""
    with model.lock:
        start = time.perf_counter()
        decoded = model.greedy_batch([model.prompt_tokens(m) for m in conversations], max_tokens, width=width)
        share = (time.perf_counter() - start) / max(1, len(decoded))
        return [_probe_answer(model, messages, steps, share, None) for messages, steps in zip(conversations, decoded)]


def _chooser(temperature: float, top_p: float, seed: int | None) -> Any:
    """argmax when ``temperature`` is 0, else a draw at ``temperature`` from the top-p nucleus."""
    import numpy as np

    if temperature <= 0:
        return argmax
    rng = np.random.default_rng(seed)

    def choose(logits: Any) -> int:
        scaled = logits.astype(np.float64) / temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
        return int(rng.choice(nucleus, p=probs[nucleus] / probs[nucleus].sum()))

    return choose


def sampled_answer(model: GgufModel, messages: list[dict[str, str]], max_tokens: int = 64, *,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> ProbeAnswer:
    """Decode from the chat-templated messages: greedily at ``temperature`` 0, else sampled (top-p,
    seeded by ``seed``; a fresh random seed when None, recorded in the answer)."""
    if temperature > 0 and seed is None:
        seed = random.randrange(2**31)
    choose = _chooser(temperature, top_p, seed)
    with model.lock:
        start = time.perf_counter()
        steps = list(model.decode(model.prompt_tokens(messages), max_tokens, choose))
        seconds = time.perf_counter() - start
        return _probe_answer(model, messages, steps, seconds, seed if temperature > 0 else None)


def _probe_answer(model: GgufModel, messages: list[dict[str, str]], steps: list[Decoded], seconds: float,
                  seed: int | None) -> ProbeAnswer:
    """The answer decoded as ``steps``: an end-of-generation token (only ever last) ends it and is no
    part of its text, but its logprob counts in the mean."""
    finished = bool(steps) and steps[-1].end
    out = [step.token for step in (steps[:-1] if finished else steps)]
    return ProbeAnswer(
        prompt=last_user_text(messages),
        answer=model.text(out).strip(),
        n_tokens=len(out),
        mean_logprob=(sum(step.logprob for step in steps) / len(steps)) if steps else None,
        seconds=seconds,
        finished=finished,
        seed=seed,
    )


@dataclass
class ProbeRun:
    gguf: str
    answers: list[ProbeAnswer] = field(default_factory=list)
    load_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def mean_logprob(self) -> float | None:
        values = [a.mean_logprob for a in self.answers if a.mean_logprob is not None]
        return sum(values) / len(values) if values else None

    @property
    def tokens_per_second(self) -> float | None:
        seconds = sum(a.seconds for a in self.answers)
        return sum(a.n_tokens for a in self.answers) / seconds if seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"gguf": self.gguf, "load_seconds": self.load_seconds, "total_seconds": self.total_seconds,
                "mean_logprob": self.mean_logprob, "tokens_per_second": self.tokens_per_second,
                "answers": [asdict(a) for a in self.answers]}


def run_probes(
    gguf: str | Path,
    probes: Iterable[list[dict[str, str]]],
    *,
    max_tokens: int = 64,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    model: GgufModel | None = None,
) -> ProbeRun:
    """Answer every probe with one GGUF (loaded here unless ``model`` is given)."""
    start = time.perf_counter()
    run = ProbeRun(gguf=str(gguf))
    own = model is None
    if model is None:
        model = GgufModel.load(gguf, n_ctx=n_ctx, n_threads=n_threads)
    run.load_seconds = time.perf_counter() - start
    try:
        for messages in probes:
            run.answers.append(greedy_answer(model, messages, max_tokens=max_tokens))
    finally:
        if own:
            model.close()
    run.total_seconds = time.perf_counter() - start
    return run


class LlamaCache:
    """Loaded models (``GgufModel``) keyed by version id, least recently used dropped beyond ``max_models``.

    Keyed by id *and* sha256 so a version whose file changed is reloaded, never served stale.
    """

    def __init__(self, max_models: int = 3, *, n_ctx: int = 2048, n_threads: int | None = None):
        self.max_models = max_models
        self.n_ctx, self.n_threads = n_ctx, n_threads
        self._models: collections.OrderedDict[tuple[str, str], GgufModel] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, version_id: str, gguf: str | Path, sha256: str = "") -> GgufModel:
        key = (version_id, sha256)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = GgufModel.load(gguf, n_ctx=self.n_ctx, n_threads=self.n_threads, name=version_id)
            self._models[key] = model
            while len(self._models) > self.max_models:
                _, old = self._models.popitem(last=False)
                with old.lock:  # never close a model mid-generation
                    old.close()
            return model

    def answer(self, version: Any, messages: list[dict[str, str]], max_tokens: int = 128, *,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> ProbeAnswer:
        """An answer from a registry ``Version``: greedy at ``temperature`` 0 (the default), else sampled."""
        model = self.get(version.id, version.gguf_path, version.gguf_sha256)
        return sampled_answer(model, messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              seed=seed)

    def __len__(self) -> int:
        return len(self._models)

    def close(self) -> None:
        with self._lock:
            for model in self._models.values():
                with model.lock:
                    model.close()
            self._models.clear()
