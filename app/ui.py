"""The Gradio Blocks: chat, settings, stop, new conversation, feedback panel, and the Versions tab.

Concurrency: generation events share the queue's ``GENERATE_CONCURRENCY_ID`` with a limit of
one, so users wait their turn in Gradio's queue (and see their position) while the engine's lock
guards the llama.cpp context as well; feedback events have their own, wider limit and never wait
behind a generation. Stop bypasses the queue: it only sets this session's flag, which the stream
checks after every token.

API (``gradio_client`` or plain HTTP; docs/app.md): ``/ask`` answers a message and returns the
turn id, the answer and the version (a ``conversation_id`` continues a logged conversation);
``/feedback`` takes a turn id with thumbs, reasons, comment and correction, and returns the
feedback id only once the event is durable. ``/ask`` shares the generation queue with the chat.

Errors: every handler is wrapped by ``app.errors.user_safe``: an internal error is logged with its
traceback and the user sees only a generic notice (the app is launched with ``show_error=False``).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import gradio as gr

from app import feedback_panel
from app.engine import GENERATE_CONCURRENCY_ID, Engine, ModelUnavailable
from app.errors import user_safe
from app.generation import Sampling
from app.policy import InputRejected
from app.session import ChatSession, ShownTurn, session_from_store
from app.writer import WriteFailed, WriterClosed, WriteTimeout
from loop.core.feedback import FeedbackError

log = logging.getLogger(__name__)

FEEDBACK_CONCURRENCY = 16
CSS = """
.model-tag { opacity: 0.65; }
#notice p { margin: 0.25em 0; }
"""


def _header(engine: Engine) -> str:
    st = engine.status()
    if st["version"] is None:
        return f"⚠️ **Model unavailable:** {st['error']}. The app stays up and will answer once a loadable version is current."
    line = f"Serving model **{st['version']}** · GGUF sha256 `{st['gguf_sha256'][:12]}`"
    for n in st["notices"]:
        line += f"\n\n⚠️ {n}"
    return line


def _chatbot(session: ChatSession) -> Any:
    return gr.Chatbot(value=session.chat_messages(), feedback_value=session.feedback_value())


def _session_key(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def build_app(engine: Engine) -> gr.Blocks:
    cfg = engine.config.app
    n_ctx = engine.config.model.n_ctx

    with gr.Blocks(title="Chat · feedback loop") as demo:
        # A plain value (deep-copied per browser session), not a callable: a callable State is
        # filled by its own load event, which could land after on_load's restored conversation.
        session_state = gr.State(ChatSession())
        saved_conversation = gr.BrowserState(None, storage_key="feedback-loop-conversation")
        header = gr.Markdown(elem_id="model-header")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chatbot = gr.Chatbot(
                    label="Chat",
                    elem_id="chatbot",
                    height=460,
                    feedback_options=("Like", "Dislike"),
                    group_consecutive_messages=False,
                    buttons=["copy"],
                )
                notice = gr.Markdown(elem_id="notice")
                with gr.Row():
                    message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=8,
                                         elem_id="message", max_lines=8)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                    new = gr.Button("New conversation", scale=1, elem_id="new-conversation")
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    system = gr.Textbox(label="System prompt", value=cfg.system_prompt, lines=2, elem_id="system-prompt")
                    with gr.Row():
                        temperature = gr.Slider(0.0, 2.0, value=cfg.temperature, step=0.05, label="Temperature")
                        top_p = gr.Slider(0.05, 1.0, value=cfg.top_p, step=0.05, label="Top-p")
                        max_tokens = gr.Slider(16, max(16, min(2048, n_ctx // 2)), value=min(cfg.max_tokens, max(16, n_ctx // 2)),
                                               step=16, label="Max tokens")
                with gr.Column(visible=False, elem_id="feedback-panel", variant="panel") as panel:
                    fb_title = gr.Markdown()
                    fb_thumbs = gr.Radio(feedback_panel.THUMB_CHOICES, label="Rating", elem_id="fb-thumbs")
                    fb_reasons = gr.CheckboxGroup(feedback_panel.reason_choices(None), label="Why?", elem_id="fb-reasons")
                    fb_comment = gr.Textbox(label="Comment", lines=2, elem_id="fb-comment")
                    fb_correction = gr.Textbox(label="Suggest a better answer", lines=5, elem_id="fb-correction")
                    with gr.Row():
                        fb_send = gr.Button("Send feedback", variant="primary", elem_id="fb-send")
                        fb_close = gr.Button("Close", elem_id="fb-close")
            _mount_versions_tab(engine)

        # -- chat ---------------------------------------------------------------------------------

        @user_safe
        def respond(text, session: ChatSession, system_prompt, temp, topp, maxtok, request: gr.Request):
            stop_flag = engine.stop_flag(_session_key(request))
            sampling = Sampling(temperature=float(temp), top_p=float(topp), max_tokens=int(maxtok))
            stream = engine.chat(conversation_id=session.conversation_id, history=session.history(),
                                 user_message=text, system_prompt=system_prompt, sampling=sampling, stop=stop_flag)
            try:
                # The first event comes before anything is added to the chat, so a refused message
                # or a missing model is reported with the text still in the box.
                first = next(stream)
            except (InputRejected, ModelUnavailable) as exc:
                gr.Warning(str(exc))
                yield _chatbot(session), gr.update(), session, f"⚠️ {exc}", gr.update(), _header(engine)
                return
            session.conversation_id = first.conversation_id
            shown = ShownTurn(None, text.strip(), "", first.version_id)
            session.turns.append(shown)
            for n in first.notices:
                gr.Info(n)
            notices = "\n\n".join(f"ℹ️ {n}" for n in first.notices)
            yield _chatbot(session), "", session, notices, session.conversation_id, _header(engine)
            try:
                for event in stream:
                    if event.kind == "delta":
                        shown.answer += event.text
                        if session.replaced_by is None:
                            yield _chatbot(session), gr.update(), session, gr.update(), gr.update(), gr.update()
                    elif event.kind == "done":
                        out = event.outcome
                        # "" (not None) marks an answer that could not be saved: finished, but no feedback.
                        shown.answer, shown.turn_id, shown.finish_reason = out.answer, out.turn_id or "", out.finish_reason
                        shown.user = out.messages[-1]["content"]
                        if out.save_error:
                            gr.Warning(out.save_error)
            finally:
                stream.close()
            if session.replaced_by is None:
                yield _chatbot(session), gr.update(), session, gr.update(), gr.update(), _header(engine)
            else:  # the user moved on: the turn is logged; the page shows the new conversation
                fresh = session.replaced_by
                yield _chatbot(fresh), gr.update(), fresh, gr.update(), fresh.conversation_id, _header(engine)

        chat_inputs = [message, session_state, system, temperature, top_p, max_tokens]
        chat_outputs = [chatbot, message, session_state, notice, saved_conversation, header]
        # "/chat" is the page's own streaming event (its inputs and outputs are the page's widgets);
        # programs use "/ask" below, which returns the turn id.
        for trigger, api in ((message.submit, dict(api_name="chat")), (send.click, dict(api_visibility="undocumented"))):
            trigger(respond, chat_inputs, chat_outputs, concurrency_limit=1, concurrency_id=GENERATE_CONCURRENCY_ID,
                    show_progress="minimal", **api)

        def on_stop(request: gr.Request):
            engine.request_stop(_session_key(request))

        stop.click(on_stop, None, None, queue=False, api_name="stop")

        @user_safe
        def on_new(old: ChatSession, request: gr.Request):
            engine.request_stop(_session_key(request))
            fresh = ChatSession()
            old.replaced_by = fresh  # the same object a running stream holds: see ChatSession
            return _chatbot(fresh), fresh, "", None, gr.update(visible=False), _header(engine)

        new_outputs = [chatbot, session_state, notice, saved_conversation, panel, header]
        new.click(on_new, [session_state], new_outputs, queue=False, api_name="new_conversation")
        # the Chatbot's own trash button
        chatbot.clear(on_new, [session_state], new_outputs, queue=False, api_visibility="undocumented")

        # -- feedback -----------------------------------------------------------------------------

        @user_safe
        def on_like(session: ChatSession, data: gr.LikeData):
            p = feedback_panel.on_like(session, engine.writer, data.index, data.liked)
            if not p.ok:
                gr.Warning(p.notice)
            return _panel_outputs(p, session)

        def _panel_outputs(p, session):
            if not p.visible:
                return (gr.update(visible=False), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(),
                        session, p.notice, _chatbot(session))
            return (
                gr.update(visible=True),
                p.title,
                gr.update(value=p.thumbs),
                gr.update(choices=feedback_panel.reason_choices(p.thumbs), value=p.reasons),
                p.comment,
                p.correction,
                session,
                p.notice,
                _chatbot(session),
            )

        panel_outputs = [panel, fb_title, fb_thumbs, fb_reasons, fb_comment, fb_correction, session_state, notice, chatbot]
        chatbot.like(on_like, [session_state], panel_outputs, concurrency_limit=FEEDBACK_CONCURRENCY,
                     concurrency_id="feedback", api_visibility="undocumented")

        def on_thumbs_change(thumbs, chosen):
            allowed = {r for _, r in feedback_panel.reason_choices(thumbs)}
            return gr.update(choices=feedback_panel.reason_choices(thumbs), value=[r for r in chosen or [] if r in allowed])

        fb_thumbs.input(on_thumbs_change, [fb_thumbs, fb_reasons], [fb_reasons], queue=False,
                        api_visibility="undocumented")

        @user_safe
        def on_feedback(session: ChatSession, thumbs, reasons, comment, correction):
            p = feedback_panel.submit(session, engine.writer, thumbs, reasons, comment, correction)
            if p.ok:
                gr.Info(p.notice)
            else:
                gr.Warning(p.notice)
            return (gr.update(visible=p.visible), session, ("✅ " if p.ok else "⚠️ ") + p.notice, _chatbot(session))

        fb_send.click(on_feedback, [session_state, fb_thumbs, fb_reasons, fb_comment, fb_correction],
                      [panel, session_state, notice, chatbot], concurrency_limit=FEEDBACK_CONCURRENCY,
                      concurrency_id="feedback", api_visibility="undocumented")
        fb_close.click(lambda: gr.update(visible=False), None, [panel], queue=False, api_visibility="undocumented")

        # -- the API for programs: chat with a turn id, feedback by turn id ----------------------

        @user_safe
        def ask(message: str, conversation_id: str = "", system_prompt: str = "", temperature: float = -1.0,
                max_tokens: int = 0) -> dict:
            """Answer `message` (continuing `conversation_id` when given; "" starts a new conversation).
            Returns {turn_id, conversation_id, answer, version, finish_reason}; the turn is durable
            when this returns. temperature < 0 and max_tokens 0 mean the app's defaults."""
            try:
                history = engine.conversation_history(conversation_id) if conversation_id else []
            except KeyError as exc:
                raise gr.Error(str(exc).strip("'\"")) from None
            sampling = engine.default_sampling()
            if temperature is not None and float(temperature) >= 0:
                sampling.temperature = float(temperature)
            if max_tokens:
                sampling.max_tokens = max(1, min(int(max_tokens), cfg.max_tokens))
            try:
                events = list(engine.chat(conversation_id=conversation_id or None, history=history,
                                          user_message=message, system_prompt=system_prompt or None,
                                          sampling=sampling))
            except (InputRejected, ModelUnavailable) as exc:
                raise gr.Error(str(exc)) from None
            start, done = events[0], events[-1]
            out = done.outcome
            if out.turn_id is None:
                raise gr.Error(out.save_error or "The answer could not be saved.")
            return {"turn_id": out.turn_id, "conversation_id": start.conversation_id, "answer": out.answer,
                    "version": out.version_id, "finish_reason": out.finish_reason}

        gr.api(ask, api_name="ask", concurrency_limit=1, concurrency_id=GENERATE_CONCURRENCY_ID)

        @user_safe
        def feedback(turn_id: str, thumbs: str = "", reasons: list[str] | None = None, comment: str = "",
                     correction: str = "") -> dict:
            """Record feedback on turn `turn_id`: thumbs "up", "down" or ""; reasons from
            loop/core/reasons.py; an optional comment and corrected answer. Returns {feedback_id, turn_id,
            thumbs, reasons, notes} only once the event is durable; the latest event per turn counts."""
            try:
                fid, clean = engine.writer.add_feedback_checked(str(turn_id or ""), thumbs or None, list(reasons or []),
                                                                comment or None, correction or None, source="api")
            except FeedbackError as exc:
                raise gr.Error(f"Feedback not saved: {exc}") from None
            except KeyError as exc:
                raise gr.Error(f"Feedback not saved: {str(exc).strip(chr(34))}") from None
            except (WriteFailed, WriteTimeout, WriterClosed) as exc:
                raise gr.Error(f"Feedback not saved: {exc}") from None
            return {"feedback_id": fid, "turn_id": turn_id, "thumbs": clean.thumbs, "reasons": clean.reasons,
                    "notes": clean.notes}

        gr.api(feedback, api_name="feedback", concurrency_limit=FEEDBACK_CONCURRENCY, concurrency_id="feedback")

        # -- page load: header, and the conversation this browser had before a reload ------------

        @user_safe
        def on_load(saved):
            session = None
            if saved:
                try:
                    session = session_from_store(engine.store, str(saved))
                except Exception as exc:  # a stale id from another home: start afresh
                    log.warning("cannot restore conversation %s: %s", saved, exc)
            session = session or ChatSession()
            return session, _chatbot(session), _header(engine)

        demo.load(on_load, [saved_conversation], [session_state, chatbot, header], api_visibility="undocumented")

        def on_unload(request: gr.Request):
            engine.forget_stop_flag(_session_key(request))

        demo.unload(on_unload)
    return demo


def _mount_versions_tab(engine: Engine) -> None:
    """The Versions tab lives in app/versions_tab.py (its own owner); mount it when present."""
    try:
        module = importlib.import_module("app.versions_tab")
    except ModuleNotFoundError as exc:
        if exc.name != "app.versions_tab":
            log.error("the Versions tab cannot be imported: %s", exc)
        return
    build = getattr(module, "build_versions_tab", None)
    if build is not None:
        build(engine)  # it makes its own gr.Tab inside our gr.Tabs
