"""The one llama.cpp wrapper: how a GGUF is opened, how a chat becomes token ids, how tokens are decoded.

Every llama.cpp user of the project goes through here: the app's chat (``app.generation.ChatModel``
builds on :class:`GgufModel`), the probes and the arena (``app.probe_runner``), the fixed measures
(``loop.version_measures``) and the exporter's verifier (``trainer.verify``, through
:func:`open_llama` with ``logits_all=True``).

Contracts:

- :func:`open_llama` is the one place a ``llama_cpp.Llama`` is built. A missing or unloadable file
  raises :class:`ModelLoadError` naming the file, never anything else (the app must stay up). Weights
  load without llama.cpp's extra buffer types (:func:`without_extra_buffer_types`: its AMX path
  segfaults on recent Intel CPUs).
- :class:`GgufModel` holds a loaded GGUF, its chat formatter (the GGUF's own template, built once;
  a GGUF without one is refused with ModelLoadError) and one lock per model: a llama.cpp context is
  not thread-safe, so whoever decodes or closes holds ``model.lock`` for the whole of it, and
  ``decode`` refuses to start while it is free. Two models never wait for each other. The lock is a
  plain ``threading.Lock``, not an ``RLock``: the app holds it across the yields of a stream that
  Gradio resumes on whichever worker thread is free, and only a plain lock may be released by
  another thread than the one that took it.
- :meth:`GgufModel.prompt_tokens` tokenises through ``loop.core.chat_template.llama_chat_tokens``:
  the template's markup with its special tokens, message text never parsed for them.
- :meth:`GgufModel.decode` is the one decode loop: after the prompt is evaluated, each step reads
  the context's last logits row, lets ``choose`` pick a token (argmax, a seeded numpy draw, or
  llama.cpp's own sampler chain reading the same row), and yields it with its log-probability under
  that row. Only the last row is read, so no ``logits_all=True`` buffer (n_ctx x n_vocab floats,
  about 400 MB for SmolLM2 at 2048 tokens) is needed.
- :meth:`GgufModel.greedy_batch` decodes many prompts greedily side by side (one ``llama_decode`` per
  step for all live sequences, each its own ``seq_id``; the prompts' common prefix evaluated once) and
  gives, per prompt, what ``decode`` with argmax yields, up to float rounding. Its sequences live in a
  second context on the same weights, opened and freed within the call: the model's own context, and
  the cache a chat keeps there for its next turn, are left as they were.

Imports: the standard library and the core at module level; numpy and llama-cpp-python lazily.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from loop.core.chat_template import llama_chat_formatter, llama_chat_tokens
from loop.core.errors import LoopError

Message = dict[str, Any]
Chooser = Callable[[Any], int]  # the last logits row (a numpy float array over the vocabulary) -> a token id


class ModelLoadError(LoopError, RuntimeError):
    """The GGUF is missing or llama.cpp cannot load it; the message says which file and why."""


def llama_threads(n_threads: int | None = 0) -> int:
    """``n_threads`` if set, else half the cores (llama-cpp-python's default for generation)."""
    return n_threads if n_threads and n_threads > 0 else max(1, (os.cpu_count() or 2) // 2)


def without_extra_buffer_types() -> None:
    """Make every ``llama_cpp.Llama`` built in this process load its weights without llama.cpp's extra
    buffer types (the AMX and CPU-repack weight layouts). Idempotent.

    On a CPU with AMX (Sapphire Rapids and later) llama.cpp repacks quantised weights into its AMX
    buffer type, and the first decode then segfaults in ``ggml_backend_amx_mul_mat``
    (ggml-org/llama.cpp#20824; reproduced with llama-cpp-python 0.3.36 and the bundled Q4_1
    SmolLM2): a crash that takes the app down with it. With the extra buffer types off every machine
    runs the same plain CPU kernels, so llama.cpp's numbers (the verifier's held-out loss) do not
    depend on the CPU model either. ``Llama`` has no argument for it; it reads its model parameters
    from ``llama_model_default_params``, which is wrapped here once.
    """
    import llama_cpp.llama_cpp as lib

    if getattr(lib.llama_model_default_params, "_loop_no_extra_bufts", False):
        return
    defaults = lib.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    params._loop_no_extra_bufts = True  # type: ignore[attr-defined]
    lib.llama_model_default_params = params


def open_llama(path: str | Path, *, n_ctx: int, n_threads: int | None = 0, logits_all: bool = False,
               n_batch: int | None = None) -> Any:
    """A ``llama_cpp.Llama`` for ``path``; ModelLoadError (never a crash) when it cannot be loaded."""
    import llama_cpp

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    # The same thread count for the prompt as for generation. llama-cpp-python's default gives the
    # prompt every core (and generation half of them); on a small shared machine those threads
    # spin-wait on each other while the web server and other users hold a core: on 2 busy cores
    # the prompt of a short chat took 2-11 s instead of 0.5 s (benchmarks/RESULTS.md).
    threads = llama_threads(n_threads)
    kwargs: dict[str, Any] = {"n_ctx": n_ctx, "logits_all": logits_all, "verbose": False, "n_threads": threads,
                              "n_threads_batch": threads, "n_gpu_layers": 0, "seed": 0}
    if n_batch is not None:
        kwargs["n_batch"] = n_batch
    without_extra_buffer_types()
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    except Exception as exc:  # llama.cpp reports a bad file as ValueError; be broad, the app must stay up
        raise ModelLoadError(f"llama.cpp could not load {path.name}: {exc}") from exc


def argmax(logits: Any) -> int:
    """The greedy choice: the first token of highest logit."""
    import numpy as np

    return int(np.argmax(logits))


def log_softmax_at(logits: Any, index: int) -> float:
    """log p(``index``) under the softmax of ``logits``, computed stably."""
    import numpy as np

    peak = float(np.max(logits))
    return float(logits[index]) - peak - math.log(float(np.sum(np.exp(logits - peak))))


@dataclass(frozen=True)
class Decoded:
    """One chosen token, its log-probability under the row it was chosen from, and whether it ends the answer."""

    token: int
    logprob: float
    end: bool  # an end-of-generation token of the vocabulary: the last step yielded


# Sequences decoded at once by greedy_batch: enough for the cycle's general prompts (33) in one pass.
# Each holds its own KV cells for the call, at least 256 of them (about 6 MB for SmolLM2-135M).
BATCH_WIDTH = 64


class GgufModel:
    """A loaded GGUF with its chat template; ``lock`` serialises use of its llama.cpp context."""

    def __init__(self, llama: Any, *, name: str = ""):
        import llama_cpp

        self.llama = llama
        self.name = name
        self.lock = threading.Lock()
        self.n_ctx: int = llama.n_ctx()
        self.n_vocab: int = llama.n_vocab()
        # `_model` / `_ctx` are llama-cpp-python internals (stable across 0.3.x); the public API offers
        # logits only with logits_all=True, the large buffer the decode loop exists to avoid.
        self._vocab = llama._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        try:
            self.formatter = llama_chat_formatter(llama)
        except ValueError:
            raise ModelLoadError(f"{name or 'the model'} has no chat template in its GGUF metadata") from None
        self._whole_formatter: Any = None

    @classmethod
    def load(cls, path: str | Path, *, n_ctx: int = 2048, n_threads: int | None = 0, name: str = "") -> Self:
        """Open ``path`` (:func:`open_llama`) as an instance of ``cls``; the llama.cpp object is closed
        again when the GGUF has no chat template."""
        llama = open_llama(path, n_ctx=n_ctx, n_threads=n_threads)
        try:
            return cls(llama, name=name or Path(path).name)
        except BaseException:
            llama.close()
            raise

    def close(self) -> None:
        """Free the llama.cpp context; the caller holds ``lock`` or knows no decode is running."""
        self.llama.close()

    # -- prompt ----------------------------------------------------------------------------------

    def render(self, messages: list[Message]) -> str:
        return self.formatter(messages=messages).prompt

    def prompt_tokens(self, messages: Sequence[Message]) -> list[int]:
        """The prompt's token ids: the template's markup with its special tokens, every message's
        content as plain text (``loop.core.chat_template``), BOS as llama-cpp-python's chat completion
        adds it. The chat, the probes and the arena all use it."""
        return llama_chat_tokens(self.llama, self.formatter, messages)

    def chat_tokens(self, messages: Sequence[Message]) -> list[int]:
        """The whole chat's token ids, without the generation prompt (the same tokenisation as
        :meth:`prompt_tokens`): what a scored example is."""
        if self._whole_formatter is None:
            import copy

            whole = copy.copy(self.formatter)
            whole.add_generation_prompt = False  # the formatter reads it at render time
            self._whole_formatter = whole
        return llama_chat_tokens(self.llama, self._whole_formatter, messages)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(self.prompt_tokens(messages))

    def text(self, tokens: Sequence[int]) -> str:
        return self.llama.detokenize(list(tokens)).decode("utf-8", errors="replace")

    # -- decoding --------------------------------------------------------------------------------

    def decode(self, prompt_ids: Sequence[int], max_tokens: int, choose: Chooser = argmax, *,
               reuse_prefix: bool = False) -> Iterator[Decoded]:
        """Yield chosen tokens after ``prompt_ids`` until an end-of-generation token (yielded, ``end``
        True), ``max_tokens`` tokens, or a full context. ValueError when the prompt leaves no room.

        ``reuse_prefix`` keeps the context's cache for the prompt's common prefix with what was
        evaluated last (as llama-cpp-python's ``generate`` does: a chat's next turn evaluates only its
        new tokens); without it the whole prompt is evaluated afresh, so the answer never depends on
        what the model was asked before. The caller holds ``lock`` until the iterator is finished or closed.
        """
        prompt = list(prompt_ids)
        room = self.n_ctx - len(prompt)
        if room <= 0:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        if not self.lock.locked():
            raise RuntimeError(f"{self.name or 'the model'}: decode called without holding the model's lock")
        return self._decode(prompt, min(max_tokens, room), choose, reuse_prefix)

    def _decode(self, prompt: list[int], limit: int, choose: Chooser, reuse_prefix: bool) -> Iterator[Decoded]:
        import numpy as np

        llama = self.llama
        self._evaluate_prompt(prompt, reuse_prefix)
        token: int | None = None
        for _ in range(limit):
            if token is not None:
                llama.eval([token])  # only when another token is wanted: a stopped answer evaluates nothing more
            # The logits the next token is chosen from: the context's last row, untouched until the
            # next eval (llama.cpp's sampler chain reads the same row and copies it before changing it).
            logits = np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(self.n_vocab,))
            token = int(choose(logits))
            end = bool(self._is_eog(self._vocab, token))
            yield Decoded(token, log_softmax_at(logits, token), end)
            if end:
                return

    def _evaluate_prompt(self, prompt: list[int], reuse_prefix: bool) -> None:
        llama = self.llama
        keep = 0
        if reuse_prefix and llama.n_tokens > 0:
            # At most all but the last prompt token: its logits row must be computed now.
            for cached, wanted in zip(llama.input_ids[: llama.n_tokens], prompt[:-1]):
                if int(cached) != wanted:
                    break
                keep += 1
        if keep and llama._ctx.kv_cache_seq_rm(-1, keep, -1):
            llama.n_tokens = keep
        else:  # nothing shared, or a model whose cache cannot be cut at a position
            llama.reset()
            keep = 0
        llama.eval(prompt[keep:])

    # -- batched greedy decoding -------------------------------------------------------------------

    def greedy_batch(self, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                     width: int = BATCH_WIDTH) -> list[list[Decoded]]:
        """Greedy continuations of every prompt, decoded side by side: the i-th list is what
        ``list(decode(prompts[i], max_tokens))`` yields (argmax, the end-of-generation token yielded
        and last), up to float rounding. ValueError, before anything is decoded, when a prompt is
        empty or leaves no room in the context.

        At most ``width`` sequences are decoded at once, each its own ``seq_id`` with its own KV cells,
        one ``llama_decode`` per step carrying one token of every live sequence; a finished sequence's
        cells are removed and its slot takes the next waiting prompt. The tokens all prompts start with
        (a chat template's default system prompt) are evaluated once and copied into each sequence. The
        sequences live in a second llama.cpp context on the same weights, opened for the call and freed
        after it, so the model's own context (and the cache a chat keeps for its next turn) is untouched.
        The caller holds ``lock``.
        """
        asked = [list(p) for p in prompts]
        for prompt in asked:
            if not prompt:
                raise ValueError("an empty prompt has no logits to decode from")
            if self.n_ctx - len(prompt) <= 0:
                raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        if not self.lock.locked():
            raise RuntimeError(f"{self.name or 'the model'}: greedy_batch called without holding the model's lock")
        limits = [min(max_tokens, self.n_ctx - len(p)) for p in asked]
        todo = [i for i, limit in enumerate(limits) if limit > 0]
        out: list[list[Decoded]] = [[] for _ in asked]
        if todo:
            n_ctx_seq = max(len(asked[i]) + limits[i] for i in todo)
            with _Streams(self, n_seq=_width(width, len(todo)), n_ctx_seq=n_ctx_seq) as streams:
                streams.share(_common_prefix([asked[i] for i in todo]))
                _side_by_side(self, streams, asked, limits, todo, out)
        return out

    def _greedy_step(self, logits: Any) -> Decoded:
        token = argmax(logits)
        return Decoded(token, log_softmax_at(logits, token), bool(self._is_eog(self._vocab, token)))


class _Streams:
    """A llama.cpp context on ``model``'s weights holding ``n_seq`` sequences of up to ``n_ctx_seq``
    tokens each (seq ids 0 .. n_seq-1) and one more (seq id ``n_seq``) for the prompts' shared prefix,
    every sequence in its own KV stream (``kv_unified`` off: a token attends over its own sequence's
    cells only), and a batch to feed it. A context manager: freed on exit, error or not.

    ``Llama(...)`` in llama-cpp-python 0.3.36 has no ``n_seq_max`` argument (it sets one only for
    embeddings), so the context is built from the model's own parameters with the low-level API.
    """

    def __init__(self, model: GgufModel, *, n_seq: int, n_ctx_seq: int):
        import llama_cpp

        llama = model.llama
        params = type(llama.context_params).from_buffer_copy(llama.context_params)
        params.n_seq_max = n_seq + 1  # and one for the prompts' shared prefix
        params.kv_unified = False
        # llama.cpp gives each stream n_ctx / n_seq_max cells, rounded up to a multiple of 256.
        params.n_ctx = (n_seq + 1) * -(-n_ctx_seq // 256) * 256
        self.n_seq = n_seq
        self.shared: list[int] = []  # the prefix held by sequence n_seq, copied into each prompt's sequence
        self.n_batch = int(params.n_batch)  # prompts are evaluated in chunks of it, as Llama.eval does
        params.n_batch = max(self.n_batch, n_seq)  # a step carries one token per sequence
        self.n_vocab = model.n_vocab
        self._lib = llama_cpp
        self.ctx = llama_cpp.llama_init_from_model(llama._model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not open a context for {n_seq} sequences of {n_ctx_seq} tokens")
        if llama_cpp.llama_n_ctx_seq(self.ctx) < n_ctx_seq:  # a sequence would run out of cells mid-answer
            llama_cpp.llama_free(self.ctx)
            raise RuntimeError(f"llama.cpp gave {n_seq} sequences fewer than {n_ctx_seq} cells each")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._lib.llama_batch_free(self.batch)
        self._lib.llama_free(self.ctx)

    def share(self, prefix: list[int]) -> None:
        """Evaluate ``prefix`` once, as the extra sequence; every prompt starts from a copy of it."""
        self._evaluate(self.n_seq, prefix, 0)
        self.shared = prefix

    def prompt(self, seq: int, tokens: list[int]) -> Any:
        """Evaluate ``tokens`` (which start with the shared prefix) as sequence ``seq``; the logits row
        of its last token."""
        if self.shared:
            # A whole-stream copy (the only kind llama.cpp makes between streams), done at the next decode.
            self._lib.llama_memory_seq_cp(self.memory, self.n_seq, seq, -1, -1)
        return self._evaluate(seq, tokens[len(self.shared):], len(self.shared))

    def _evaluate(self, seq: int, tokens: list[int], start: int) -> Any:
        """Evaluate ``tokens`` as sequence ``seq`` from position ``start``, in chunks of ``n_batch`` as
        ``Llama.eval`` does; the logits row of the last token."""
        rows = 0
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset:offset + self.n_batch]
            self._decode([(seq, token, start + offset + k) for k, token in enumerate(chunk)], last_only=True)
            rows = len(chunk)
        return self.logits(rows - 1) if rows else None

    def step(self, entries: list[tuple[int, int, int]]) -> None:
        """Evaluate one ``(seq, token, position)`` per live sequence in one ``llama_decode``; row ``k``
        of :meth:`logits` is then the ``k``-th entry's."""
        self._decode(entries, last_only=False)

    def logits(self, row: int) -> Any:
        import numpy as np

        pointer = self._lib.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def drop(self, seq: int) -> None:
        """Remove every cell of ``seq`` (removing a whole sequence never fails)."""
        self._lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def _decode(self, entries: list[tuple[int, int, int]], *, last_only: bool) -> None:
        batch = self.batch
        batch.n_tokens = len(entries)
        for k, (seq, token, pos) in enumerate(entries):
            batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, pos, 1
            batch.seq_id[k][0] = seq
            batch.logits[k] = not last_only or k == len(entries) - 1
        status = self._lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status}) on a batch of {len(entries)} tokens")


def _side_by_side(model: GgufModel, streams: _Streams, prompts: list[list[int]], limits: list[int],
                  todo: list[int], out: list[list[Decoded]]) -> None:
    """Fill ``out[i]`` for every ``i`` of ``todo``: prompts take free slots in order, every live
    sequence advances one token per step, a sequence stops at an end-of-generation token or its limit
    and frees its slot (its last token is never evaluated, as in :meth:`GgufModel.decode`)."""
    waiting = list(reversed(todo))
    free = list(reversed(range(streams.n_seq)))
    live: dict[int, int] = {}  # seq -> prompt index

    def record(seq: int, i: int, logits: Any) -> None:
        out[i].append(model._greedy_step(logits))
        if out[i][-1].end or len(out[i]) >= limits[i]:
            streams.drop(seq)
            free.append(seq)
        else:
            live[seq] = i

    while waiting or live:
        while waiting and free:
            seq, i = free.pop(), waiting.pop()
            record(seq, i, streams.prompt(seq, prompts[i]))
        if not live:
            continue
        stepping = list(live.items())
        live.clear()
        streams.step([(seq, out[i][-1].token, len(prompts[i]) + len(out[i]) - 1) for seq, i in stepping])
        for row, (seq, i) in enumerate(stepping):
            record(seq, i, streams.logits(row))


def _width(asked: int, n_prompts: int) -> int:
    """Sequences to decode at once: ``asked``, no more than there are prompts, and within llama.cpp's
    limit on sequences once the shared prefix has its own."""
    import llama_cpp

    return max(1, min(asked, n_prompts, int(llama_cpp.llama_max_parallel_sequences()) - 1))


def _common_prefix(prompts: list[list[int]]) -> list[int]:
    """The tokens every prompt starts with, short of the shortest prompt's last (whose logits each
    prompt needs of its own)."""
    shortest = min(prompts, key=len)
    n = 0
    while n < len(shortest) - 1 and all(p[n] == shortest[n] for p in prompts):
        n += 1
    return shortest[:n]
