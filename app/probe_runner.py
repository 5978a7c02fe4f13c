"""Run a GGUF on prompts through llama-cpp-python (greedily, or sampled): answers, mean logprob, timing.

Used by ``python -m loop.versions compare`` and by the app's Versions tab (greedy side-by-side
answers, and sampled answers in the blind arena, so that the arena's answers cannot be matched to
the side-by-side view's). Decoding is a small loop of our own rather than ``create_chat_completion``:
greedy is then exactly argmax (no sampler chain in between), and each chosen token's logprob
comes from the last row of logits, so no ``logits_all=True`` buffer (n_ctx x vocab floats, about
400 MB for SmolLM2 at 2048 tokens) is needed. Prompts are tokenised exactly as the app's chat
tokenises them (``loop.core.chat_template``): a prompt's text is never read as special tokens.

Generation is serialised by one process-wide lock: a llama.cpp context is not thread-safe, and on
a small CPU two interleaved generations only make each other slower.
"""

from __future__ import annotations

import collections
import math
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loop.core.chat_template import llama_chat_formatter, llama_chat_tokens
from loop.core.probes import FALLBACK_PROBES, as_messages, last_user_text, load_probes, probes_file

# The probe set is the core's (``loop.core.probes``); it is named here too so that callers that run
# probes find the set and the runner in one place.
__all__ = [
    "FALLBACK_PROBES", "GENERATION_LOCK", "LlamaCache", "ProbeAnswer", "ProbeRun", "as_messages", "greedy_answer",
    "last_user_text", "load_llama", "load_probes", "probes_file", "render_prompt", "run_probes", "sampled_answer",
]

GENERATION_LOCK = threading.RLock()

def load_llama(gguf: str | Path, *, n_ctx: int = 2048, n_threads: int | None = None) -> Any:
    import os

    from llama_cpp import Llama

    # The same thread count for the prompt as for decoding: llama.cpp's default gives the prompt every
    # core, which on a small busy machine made short prompts several times slower (see docs/app.md).
    threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0,
                 logits_all=False, verbose=False)


@dataclass
class ProbeAnswer:
    prompt: str
    answer: str
    n_tokens: int
    mean_logprob: float | None  # mean log p of each chosen token, the end-of-turn token included
    seconds: float
    finished: bool  # ended on an end-of-generation token rather than the token limit
    seed: int | None = None  # the sampling seed; None for a greedy answer


def _formatter(llm: Any) -> Any:
    cached = getattr(llm, "_probe_formatter", None)
    if cached is None:
        cached = llm._probe_formatter = llama_chat_formatter(llm)
    return cached


def render_prompt(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat-templated prompt, exactly as the app's chat makes them
    (``loop.core.chat_template.llama_chat_tokens``: the messages' text is never read as special tokens)."""
    return llama_chat_tokens(llm, _formatter(llm), messages)


def _log_softmax_at(logits: Any, index: int) -> float:
    import numpy as np

    top = float(np.max(logits))
    return float(logits[index]) - top - math.log(float(np.sum(np.exp(logits - top))))


def greedy_answer(llm: Any, messages: list[dict[str, str]], max_tokens: int = 64) -> ProbeAnswer:
    """Decode greedily (argmax) from the chat-templated messages."""
    return sampled_answer(llm, messages, max_tokens=max_tokens, temperature=0.0)


def _chooser(temperature: float, top_p: float, seed: int | None) -> Any:
    """argmax when ``temperature`` is 0, else a draw at ``temperature`` from the top-p nucleus."""
    import numpy as np

    if temperature <= 0:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)

    def choose(logits: Any) -> int:
        scaled = logits.astype(np.float64) / temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
        return int(rng.choice(nucleus, p=probs[nucleus] / probs[nucleus].sum()))

    return choose


def sampled_answer(llm: Any, messages: list[dict[str, str]], max_tokens: int = 64, *, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int | None = None) -> ProbeAnswer:
    """Decode from the chat-templated messages: greedily at ``temperature`` 0, else sampled (top-p,
    seeded by ``seed``; a fresh random seed when None, recorded in the answer)."""
    import llama_cpp
    import numpy as np

    if temperature > 0 and seed is None:
        seed = random.randrange(2**31)
    choose = _chooser(temperature, top_p, seed)
    with GENERATION_LOCK:
        start = time.perf_counter()
        prompt = render_prompt(llm, messages)
        room = llm.n_ctx() - len(prompt)
        if room <= 0:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {llm.n_ctx()}")
        # `_model` / `_ctx` are llama-cpp-python internals (stable across 0.3.x); the public API
        # offers logits only with logits_all=True, the large buffer this loop exists to avoid.
        vocab, n_vocab = llm._model.vocab, llm.n_vocab()
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        logprobs: list[float] = []
        finished = False
        for _ in range(min(max_tokens, room)):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
            token = choose(logits)
            logprobs.append(_log_softmax_at(logits, token))
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finished = True
                break
            out.append(token)
            llm.eval([token])
        text = llm.detokenize(out).decode("utf-8", errors="replace").strip()
        return ProbeAnswer(
            prompt=last_user_text(messages),
            answer=text,
            n_tokens=len(out),
            mean_logprob=(sum(logprobs) / len(logprobs)) if logprobs else None,
            seconds=time.perf_counter() - start,
            finished=finished,
            seed=seed if temperature > 0 else None,
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
    llm: Any = None,
) -> ProbeRun:
    """Answer every probe with one GGUF (loaded here unless ``llm`` is given)."""
    start = time.perf_counter()
    run = ProbeRun(gguf=str(gguf))
    own = llm is None
    if own:
        llm = load_llama(gguf, n_ctx=n_ctx, n_threads=n_threads)
    run.load_seconds = time.perf_counter() - start
    try:
        for messages in probes:
            run.answers.append(greedy_answer(llm, messages, max_tokens=max_tokens))
    finally:
        if own:
            llm.close()
    run.total_seconds = time.perf_counter() - start
    return run


class LlamaCache:
    """Loaded models keyed by version id, least recently used dropped beyond ``max_models``.

    Keyed by id *and* sha256 so a version whose file changed is reloaded, never served stale.
    """

    def __init__(self, max_models: int = 3, *, n_ctx: int = 2048, n_threads: int | None = None):
        self.max_models = max_models
        self.n_ctx, self.n_threads = n_ctx, n_threads
        self._models: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, version_id: str, gguf: str | Path, sha256: str = "") -> Any:
        key = (version_id, sha256)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            llm = load_llama(gguf, n_ctx=self.n_ctx, n_threads=self.n_threads)
            self._models[key] = llm
            while len(self._models) > self.max_models:
                _, old = self._models.popitem(last=False)
                with GENERATION_LOCK:  # never close a model mid-generation
                    old.close()
            return llm

    def answer(self, version: Any, messages: list[dict[str, str]], max_tokens: int = 128, *,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> ProbeAnswer:
        """An answer from a registry ``Version``: greedy at ``temperature`` 0 (the default), else sampled."""
        llm = self.get(version.id, version.gguf_path, version.gguf_sha256)
        return sampled_answer(llm, messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def __len__(self) -> int:
        return len(self._models)

    def close(self) -> None:
        with self._lock, GENERATION_LOCK:
            for llm in self._models.values():
                llm.close()
            self._models.clear()
