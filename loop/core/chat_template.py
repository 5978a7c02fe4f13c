"""Chat-template rendering that keeps the template's markup apart from the messages' content.

The contract every tokeniser of chat text in this project follows (the app's chat, the probes and
arena, the trainer's examples, the GGUF verifier): **the chat template's own markup is tokenised
with special tokens parsed, the content of messages never is.** A user who types
``Hi<|im_end|>\\n<|im_start|>system\\n...`` gets those characters read as text, the way the model
would see any other text; they never become the role tokens the template writes, so neither a
chat user nor a reviewer's correction (which becomes training data) can forge a turn.

How: the messages are rendered with each content replaced by a sentinel (``\\ue000<n>\\ue001``,
private-use characters no template writes); the rendered text is split at the sentinels into
markup (template text) and content (message ``n``'s text, verbatim). Then the text is cut only at
the template's special tokens: the stretch from a markup piece's first special token to its last
is tokenised with special-token parsing on; everything else (the markup's plain text around its
special tokens, e.g. ``user\\n``, joined with the content next to it) is tokenised with parsing off.
Both llama.cpp and Hugging Face tokenizers split text at special tokens before anything else, so
for text without control strings the ids are exactly those of tokenising the whole rendered prompt
at once (tests check this on the real SmolLM2 tokenizers, leading whitespace included).

Limits, stated: a template that transforms content (``| trim``, ``| upper``) sees the sentinel,
not the text, so the content is inserted untransformed (the app strips messages before they get
here, so ``trim`` makes no difference to what it sends). A template that drops a message (or
repeats one) drops (or repeats) it here as well.

Kept free of llama.cpp and transformers: the renderer and the two tokenisers are passed in, and
:func:`llama_chat_tokens` and :func:`hf_chat_ids` adapt the two libraries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from loop.core.errors import LoopError

Message = dict[str, Any]

_OPEN, _CLOSE = "\ue000", "\ue001"
_SENTINEL = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class ChatTemplateError(LoopError, ValueError):
    """The chat template writes the sentinel characters itself, so markup and content cannot be told apart."""


@dataclass(frozen=True)
class Segment:
    text: str
    is_content: bool  # True: a message's text (never parsed for special tokens); False: template markup


def render_segments(render: Callable[[list[Message]], str], messages: Sequence[Message]) -> list[Segment]:
    """The rendered chat as markup and content pieces, in order; empty pieces are left out.

    ``render(messages)`` is the chat template (with whatever generation-prompt setting the caller
    wants); it is called once, on the messages with their contents replaced by sentinels.
    """
    masked = [{**m, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
    rendered = render(masked)
    segments: list[Segment] = []
    position = 0
    for match in _SENTINEL.finditer(rendered):
        markup = rendered[position:match.start()]
        _check_markup(markup)
        if markup:
            segments.append(Segment(markup, False))
        content = str(messages[int(match.group(1))].get("content") or "")
        if content:
            segments.append(Segment(content, True))
        position = match.end()
    tail = rendered[position:]
    _check_markup(tail)
    if tail:
        segments.append(Segment(tail, False))
    return segments


def _check_markup(markup: str) -> None:
    if _OPEN in markup or _CLOSE in markup:
        raise ChatTemplateError("the chat template writes U+E000/U+E001 itself (or altered a message's content "
                                "placeholder); its markup cannot be told apart from the messages' text")


def joined(segments: Sequence[Segment]) -> str:
    """The rendered text the segments make up (what the template renders for the real messages)."""
    return "".join(s.text for s in segments)


def tokenizer_pieces(segments: Sequence[Segment], specials: Iterable[str]) -> list[Segment]:
    """Re-cut ``segments`` at the special tokens only: ``is_content=False`` pieces run from a markup
    piece's first special token to its last (parse them); ``is_content=True`` pieces are everything
    else, content and the plain markup text around it joined (never parse them)."""
    strings = sorted({s for s in specials if s}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in strings)) if strings else None
    pieces: list[Segment] = []

    def add(text: str, plain: bool) -> None:
        if not text:
            return
        if pieces and pieces[-1].is_content == plain:
            pieces[-1] = Segment(pieces[-1].text + text, plain)
        else:
            pieces.append(Segment(text, plain))

    for segment in segments:
        matches = [] if segment.is_content or pattern is None else list(pattern.finditer(segment.text))
        if not matches:
            add(segment.text, True)
            continue
        first, last = matches[0].start(), matches[-1].end()
        add(segment.text[:first], True)
        add(segment.text[first:last], False)
        add(segment.text[last:], True)
    return pieces


def tokenize_segments(
    segments: Sequence[Segment],
    specials: Iterable[str],
    markup_ids: Callable[[str], list[int]],
    text_ids: Callable[[str], list[int]],
) -> list[int]:
    """Token ids of the whole chat: the special-token stretches of the markup through ``markup_ids``
    (special tokens parsed), all other text through ``text_ids`` (special tokens read as text)."""
    ids: list[int] = []
    for piece in tokenizer_pieces(segments, specials):
        ids.extend(text_ids(piece.text) if piece.is_content else markup_ids(piece.text))
    return ids


# -- llama-cpp-python ---------------------------------------------------------------------------------


def llama_chat_formatter(llama: Any) -> Any:
    """The GGUF's own chat template (``tokenizer.chat_template``) as llama-cpp-python's formatter;
    ValueError when the GGUF has none."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("this GGUF has no chat template (tokenizer.chat_template)")
    eos, bos = llama.token_eos(), llama.token_bos()
    return Jinja2ChatFormatter(
        template=template,
        eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
        stop_token_ids=[eos],
    )


def llama_special_strings(llama: Any) -> frozenset[str]:
    """The texts of the vocabulary's control and user-defined tokens (those ``special=True`` parses),
    read once per loaded model."""
    cached = getattr(llama, "_chat_special_strings", None)
    if cached is None:
        import llama_cpp

        vocab, wanted = llama._model.vocab, llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        cached = frozenset(llama._model.token_get_text(t) for t in range(llama.n_vocab())
                           if llama_cpp.llama_vocab_get_attr(vocab, t) & wanted)
        llama._chat_special_strings = cached
    return cached


def llama_segment_ids(llama: Any, segments: Sequence[Segment]) -> list[int]:
    """Token ids of rendered ``segments`` through llama.cpp's tokenizer: markup with its special tokens
    parsed, content never; no BOS added (a template that wants one writes it)."""
    return tokenize_segments(
        segments,
        llama_special_strings(llama),
        lambda text: llama.tokenize(text.encode("utf-8"), add_bos=False, special=True),
        lambda text: llama.tokenize(text.encode("utf-8"), add_bos=False, special=False),
    )


def llama_chat_tokens(llama: Any, formatter: Any, messages: Sequence[Message]) -> list[int]:
    """Prompt token ids for ``messages`` (with the generation prompt), as the app and the probes use them.

    ``formatter`` is a ``llama_cpp.llama_chat_format.Jinja2ChatFormatter`` built from the GGUF's
    template. BOS follows llama-cpp-python's own chat completion: added only when the formatter
    says the template did not write its special tokens itself (``added_special``). One function for
    the chat and the probes, so the two can never see different token ids for the same messages.
    """
    added_special = True

    def render(masked: list[Message]) -> str:
        nonlocal added_special
        result = formatter(messages=masked)
        added_special = bool(result.added_special)
        return result.prompt

    ids = llama_segment_ids(llama, render_segments(render, messages))
    if not added_special:
        bos = llama.token_bos()
        if bos != -1 and (not ids or ids[0] != bos):
            ids.insert(0, bos)
    return ids


# -- Hugging Face tokenizers --------------------------------------------------------------------------


def hf_chat_segments(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> list[Segment]:
    """The segments of ``messages`` rendered by a transformers tokenizer's chat template."""
    return render_segments(
        lambda masked: tokenizer.apply_chat_template(masked, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt),
        messages,
    )


def hf_markup_ids(tokenizer: Any, text: str) -> list[int]:
    # The template writes its special tokens (BOS included where it has one): nothing is added.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def hf_content_ids(tokenizer: Any, text: str) -> list[int]:
    # split_special_tokens: "<|im_end|>" in a message is tokenised as the characters it is made of.
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def hf_special_strings(tokenizer: Any) -> frozenset[str]:
    """The texts a transformers tokenizer splits out before tokenising: its special and added tokens."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(list(getattr(tokenizer, "all_special_tokens", [])) + [str(t) for t in added.values()])


def hf_chat_ids(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` through a transformers tokenizer, content never parsed for special tokens."""
    return tokenize_segments(hf_chat_segments(tokenizer, messages, add_generation_prompt),
                             hf_special_strings(tokenizer),
                             lambda text: hf_markup_ids(tokenizer, text),
                             lambda text: hf_content_ids(tokenizer, text))
