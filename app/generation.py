"""One GGUF served through llama-cpp-python: the chat template, streaming, token log-probabilities.

Why the app decodes through ``loop.core.gguf_model.GgufModel.decode`` (llama.cpp's own sampler chain
choosing each token, as ``Llama.generate`` builds it) rather than ``create_chat_completion(stream=True,
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

Loading, the lock, tokenisation and the decode loop are ``GgufModel``'s (the probes and the arena use
the same); a llama.cpp context is not thread-safe: ``ChatModel.lock`` must be held for a whole stream.
"""

from __future__ import annotations

import codecs
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from loop.core.gguf_model import GgufModel


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


def _llama_sampler(llama: Any, sampling: Sampling) -> Callable[[Any], int]:
    """A chooser drawing from llama.cpp's own sampler chain (top-k, top-p, min-p, temperature,
    repeat penalty, seeded by ``sampling.seed``), as llama-cpp-python's ``generate`` builds it; it
    reads the context's last logits row, the row ``GgufModel.decode`` hands over."""
    llama.set_seed(sampling.seed)
    # `_init_sampler` is llama-cpp-python's own builder (stable across 0.3.x): the chain ``generate`` uses.
    sampler = llama._init_sampler(top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                                  temp=sampling.temperature, repeat_penalty=sampling.repeat_penalty)
    return lambda _logits: int(sampler.sample(llama._ctx, -1))


class ChatModel(GgufModel):
    """A loaded GGUF served to the chat: ``GgufModel`` plus streaming with stats, stop and UTF-8 text."""

    def stream(
        self,
        prompt_tokens: list[int],
        sampling: Sampling,
        stats: StreamStats,
        stop: threading.Event | None = None,
    ) -> Iterator[Step]:
        """Yield one Step per sampled token until an end-of-generation token, ``max_tokens``, a full
        context or ``stop``; ``stats`` is filled in as it goes. The caller holds ``self.lock``."""
        if sampling.seed is None:
            sampling.seed = random.randrange(2**31)
        stats.prompt_tokens = len(prompt_tokens)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        first_at: float | None = None
        # A chat's next turn shares its prefix with the last: only the new tokens are evaluated.
        steps = self.decode(prompt_tokens, sampling.max_tokens, _llama_sampler(self.llama, sampling),
                            reuse_prefix=True)
        try:
            for step in steps:
                if first_at is None:
                    first_at = time.perf_counter()
                if step.end:
                    stats.finish_reason = "stop"
                    break
                stats.logprobs.append(step.logprob)
                stats.completion_tokens += 1
                text = decoder.decode(self.llama.detokenize([step.token]))
                yield Step(text, step.token, step.logprob)
                if stop is not None and stop.is_set():
                    stats.finish_reason = "stopped"
                    break
            # Ending without an end-of-generation token: max_tokens or the context is full ("length").
        finally:
            # Closing the decode here (also when our caller is closed mid-stream) leaves the context
            # consistent for the next request, which re-evaluates from the common prefix. Bytes of a
            # character cut off by a hard stop are dropped, not shown half-decoded.
            steps.close()
            if first_at is not None:
                stats.decode_s = time.perf_counter() - first_at
