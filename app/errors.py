"""What a chat user sees when a handler fails: a notice the app wrote, never an internal error.

Gradio shows a ``gr.Error``'s message to the user always, and any other exception's text only with
``show_error=True``, which the app does not set. :func:`user_safe` wraps an event handler so that
an unexpected exception is logged in full (traceback included) and the user gets
:data:`GENERIC_ERROR`, without file paths, library internals or data from other users in it.
Refusals the app means to show (``gr.Error``, with their own wording) pass through unchanged.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

log = logging.getLogger("app")

GENERIC_ERROR = "Something went wrong on our side. It has been logged; please try again."


def user_safe(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with internal errors logged and replaced by :data:`GENERIC_ERROR` for the user.

    A generator stays a generator (Gradio streams from it) and the signature is kept
    (``functools.wraps``), so Gradio still injects ``gr.Request`` / ``gr.LikeData`` arguments.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception:
                log.exception("handler %s failed", name)
                raise gr.Error(GENERIC_ERROR) from None

        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception:
            log.exception("handler %s failed", name)
            raise gr.Error(GENERIC_ERROR) from None

    return call
