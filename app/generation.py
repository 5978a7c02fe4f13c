"""One GGUF served through llama-cpp-python: the chat template, streaming, token log-probabilities.

Why the app drives ``Llama.generate`` itself rather than ``create_chat_completion(stream=True,
logprobs=True, top_logprobs=1)``: in llama-cpp-python 0.3.x, ``logprobs`` refuses a model created
with ``logits_all=False``, and ``logits_all=True`` keeps an ``n_ctx x n_vocab`` float matrix
(2048 x 49152 x 4 B = 400 MB for SmolLM2), computes logits for every prompt token, and sorts the
whole vocabulary in Python for every generated token. Here, with ``logits_all=False``, the logits
of the last position are read straight from the llama.cpp context right after each token is
sampled (they are exactly the distribution it was sampled from), and one log-softmax gives the
token's log-probability, the same number llama.cpp's ``logprobs`` would report.

The prompt is rendered with the chat template stored in the GGUF (``tokenizer.chat_template``),
through the same ``Jinja2ChatFormatter`` that ``create_chat_completion`` uses for it, and
generation stops on any end-of-generation token of the model's vocabulary. Unlike
``create_chat_completion``, which tokenises the whole rendered prompt with special tokens parsed,
only the template's markup is parsed for special tokens: what users type (``<|im_end|>`` included)
is always text to the model, never a role token (``loop.core.chat_template``).

A llama.cpp context is not thread-safe: ``ChatModel.lock`` must be held for a whole stream.
"""

from __future__ import annotations

import codecs
import math
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loop.core.chat_template import llama_chat_formatter, llama_chat_tokens
from loop.core.errors import LoopError

Message = dict[str, str]


class ModelLoadError(LoopError, RuntimeError):
    """The GGUF is missing or llama.cpp cannot load it; the message says which file and why."""


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    seed: int | None = None  # None: a fresh random seed per answer (recorded in the turn's log)
    # llama-cpp-python's own defaults for chat completion, stated so the log says what was used.
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Step:
    """One sampled token: the text it adds (may be empty mid-way through a UTF-8 character)."""

    text: str
    token: int
    logprob: float


@dataclass
class StreamStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (end-of-generation token), "length", "stopped" (user)
    decode_s: float = 0.0  # from first token to last

    @property
    def logprob_mean(self) -> float | None:
        return float(sum(self.logprobs) / len(self.logprobs)) if self.logprobs else None

    @property
    def logprob_min(self) -> float | None:
        return float(min(self.logprobs)) if self.logprobs else None


def serving_threads(n_threads: int = 0) -> int:
    """``n_threads`` if set, else half the cores (llama-cpp-python's default for generation)."""
    return n_threads if n_threads > 0 else max(1, (os.cpu_count() or 2) // 2)


def load_llama(path: str | Path, *, n_ctx: int = 2048, n_threads: int = 0) -> Any:
    """A ``llama_cpp.Llama`` for ``path``; ModelLoadError (never a crash) when it cannot be loaded."""
    import llama_cpp

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    # The same thread count for the prompt as for generation. llama-cpp-python's default gives the
    # prompt every core (and generation half of them); on a small shared machine those threads
    # spin-wait on each other while the web server and other users hold a core: on 2 busy cores
    # the prompt of a short chat took 2-11 s instead of 0.5 s (benchmarks/RESULTS.md).
    threads = serving_threads(n_threads)
    kwargs: dict[str, Any] = {"n_ctx": n_ctx, "logits_all": False, "verbose": False, "n_threads": threads,
                              "n_threads_batch": threads}
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    except Exception as exc:  # llama.cpp reports a bad file as ValueError; be broad, the app must stay up
        raise ModelLoadError(f"llama.cpp could not load {path.name}: {exc}") from exc


class ChatModel:
    """A loaded GGUF with its chat template; ``lock`` serialises use of its llama.cpp context."""

    def __init__(self, llama: Any, *, name: str = ""):
        import llama_cpp

        self.llama = llama
        self.name = name
        self.lock = threading.Lock()
        self.n_ctx = llama.n_ctx()
        self.n_vocab = llama.n_vocab()
        self._vocab = llama._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        try:
            self.formatter = llama_chat_formatter(llama)
        except ValueError:
            raise ModelLoadError(f"{name or 'the model'} has no chat template in its GGUF metadata") from None

    @classmethod
    def load(cls, path: str | Path, *, n_ctx: int = 2048, n_threads: int = 0, name: str = "") -> ChatModel:
        return cls(load_llama(path, n_ctx=n_ctx, n_threads=n_threads), name=name or Path(path).name)

    def close(self) -> None:
        self.llama.close()

    # -- prompt ----------------------------------------------------------------------------------

    def render(self, messages: list[Message]) -> str:
        return self.formatter(messages=messages).prompt

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        """The prompt's token ids: the template's markup with its special tokens, every message's
        content as plain text (``loop.core.chat_template``), BOS as llama-cpp-python's chat completion
        adds it. The probes and the arena use the same function."""
        return llama_chat_tokens(self.llama, self.formatter, messages)

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.prompt_tokens(messages))

    # -- generation ------------------------------------------------------------------------------

    def stream(
        self,
        prompt_tokens: list[int],
        sampling: Sampling,
        stats: StreamStats,
        stop: threading.Event | None = None,
    ) -> Iterator[Step]:
        """Yield one Step per sampled token until an end-of-generation token, ``max_tokens`` or
        ``stop``; ``stats`` is filled in as it goes. The caller holds ``self.lock``."""
        llama = self.llama
        if sampling.seed is None:
            sampling.seed = random.randrange(2**31)
        llama.set_seed(sampling.seed)
        stats.prompt_tokens = len(prompt_tokens)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        first_at: float | None = None
        n_vocab = self.n_vocab
        generator = llama.generate(
            prompt_tokens,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            temp=sampling.temperature,
            repeat_penalty=sampling.repeat_penalty,
        )
        try:
            for token in generator:
                if first_at is None:
                    first_at = time.perf_counter()
                if self._is_eog(self._vocab, token):
                    stats.finish_reason = "stop"
                    break
                # The logits this token was sampled from: the context's last row, untouched until
                # the generator evaluates the token on its next step.
                logits = np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(n_vocab,))
                peak = float(logits.max())
                lse = peak + math.log(float(np.exp(logits - peak).sum()))
                logprob = float(logits[token]) - lse
                stats.logprobs.append(logprob)
                stats.completion_tokens += 1
                text = decoder.decode(llama.detokenize([token]))
                yield Step(text, token, logprob)
                if stop is not None and stop.is_set():
                    stats.finish_reason = "stopped"
                    break
                if stats.completion_tokens >= sampling.max_tokens:
                    stats.finish_reason = "length"
                    break
                if len(prompt_tokens) + stats.completion_tokens >= self.n_ctx:
                    stats.finish_reason = "length"  # the context is full
                    break
        finally:
            # Closing the generator here (also when our caller is closed mid-stream) leaves the
            # context consistent for the next request, which re-evaluates from the common prefix.
            # Bytes of a character cut off by a hard stop are dropped, not shown half-decoded.
            generator.close()
            if first_at is not None:
                stats.decode_s = time.perf_counter() - first_at
