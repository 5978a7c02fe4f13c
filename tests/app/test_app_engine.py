"""The engine on the real bundled model: logging, input policy, stop, hot-swap, a broken model."""

from __future__ import annotations

import threading
import time

import pytest

from app.engine import Engine, ModelUnavailable
from app.generation import Sampling, StreamStats
from app.policy import InputRejected
from loop.config import load_config


def run(stream):
    events = list(stream)
    assert events[0].kind == "start" and events[-1].kind == "done"
    return events


def test_a_turn_is_logged_with_everything(engine):
    events = run(engine.chat(conversation_id=None, history=[], user_message="Name a colour.",
                             system_prompt="Answer in one word.", sampling=Sampling(temperature=0.5, top_p=0.8, max_tokens=12)))
    out = events[-1].outcome
    engine.flush()
    streamed = "".join(e.text for e in events if e.kind == "delta")
    assert out.answer == streamed.strip() and out.answer
    turn = engine.store.get_turn(out.turn_id)
    version = engine.registry.current()
    assert turn["messages"] == [{"role": "system", "content": "Answer in one word."},
                                {"role": "user", "content": "Name a colour."}]
    assert turn["answer"] == out.answer
    assert turn["model_version"] == version.id == "v1" and turn["gguf_sha256"] == version.gguf_sha256
    s = turn["sampling"]
    assert (s["temperature"], s["top_p"], s["max_tokens"]) == (0.5, 0.8, 12)
    assert isinstance(s["seed"], int) and s["finish_reason"] in ("stop", "length")
    assert 0 < turn["ttft_s"] <= turn["latency_s"]
    assert turn["prompt_tokens"] == out.prompt_tokens > 5 and 0 < turn["completion_tokens"] <= 12
    assert turn["logprob_min"] <= turn["logprob_mean"] <= 0.0
    assert turn["conversation_id"] == events[0].conversation_id and turn["position"] == 0


def test_logprobs_match_llama_cpps_own(shared_chat_model, bundled_gguf):
    """Our per-token log-probabilities equal what llama.cpp reports with logits_all=True."""
    from loop.core.gguf_model import open_llama

    model = shared_chat_model
    tokens = model.prompt_tokens([{"role": "user", "content": "What is the capital of France?"}])
    with model.lock:
        steps = list(model.stream(tokens, Sampling(temperature=0.0, max_tokens=8, seed=1), StreamStats()))
    reference = open_llama(bundled_gguf, n_ctx=512, logits_all=True)
    try:
        ref = reference.create_completion(tokens, max_tokens=8, temperature=0.0, logprobs=1)
    finally:
        reference.close()
    ref_lp = ref["choices"][0]["logprobs"]["token_logprobs"]
    ours = [s.logprob for s in steps]
    assert "".join(s.text for s in steps).startswith(ref["choices"][0]["text"][:10])
    assert len(ours) >= 4
    assert ours[: len(ref_lp)] == pytest.approx(ref_lp[: len(ours)], abs=2e-3)


def test_empty_message_never_reaches_the_model(engine, monkeypatch):
    def no_model(*_a, **_k):
        raise AssertionError("the model was asked for an empty message")

    monkeypatch.setattr(engine, "_acquire", no_model)
    with pytest.raises(InputRejected, match="empty message"):
        next(engine.chat(conversation_id=None, history=[], user_message="  \n "))
    engine.flush()
    assert engine.store.count_turns() == 0


def test_oversized_message_is_refused(engine):
    engine.config.app.max_message_chars = 50
    with pytest.raises(InputRejected, match="limit is 50"):
        next(engine.chat(conversation_id=None, history=[], user_message="x" * 51))
    engine.flush()
    assert engine.store.count_turns() == 0


def test_history_beyond_the_context_drops_oldest_turns(monkeypatch):
    monkeypatch.setenv("LOOP_MODEL__N_CTX", "256")
    eng = Engine(load_config())
    try:
        history = []
        for i in range(8):
            history += [{"role": "user", "content": f"Tell me fact number {i} about the sea, please."},
                        {"role": "assistant", "content": f"Fact {i}: " + "the sea is deep and wide and blue " * 3}]
        events = run(eng.chat(conversation_id=None, history=history, user_message="One more?",
                              sampling=Sampling(temperature=0.0, max_tokens=32)))
        assert any("left out" in n for n in events[0].notices)
        out = events[-1].outcome
        assert out.dropped_turns > 0 and out.prompt_tokens + 32 <= 256
        eng.flush()
        logged = eng.store.get_turn(out.turn_id)["messages"]
        assert logged[-1] == {"role": "user", "content": "One more?"}
        assert "fact number 0 " not in " ".join(m["content"] for m in logged)  # the oldest went first
        assert "fact number 7 " in " ".join(m["content"] for m in logged)  # the newest stayed
        # A message that alone does not fit is refused: no model call, no turn, no conversation.
        with pytest.raises(InputRejected, match="too long for the model"):
            next(eng.chat(conversation_id=None, history=[], user_message="sea " * 400))
        eng.flush()
        assert eng.store.count_turns() == 1
        assert eng.store._conn().execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == 1
        assert not eng._served.model.lock.locked() and eng._served.users == 0
    finally:
        eng.close()


def test_stop_ends_the_stream_and_logs_the_partial_answer(engine):
    stop = threading.Event()
    stream = engine.chat(conversation_id=None, history=[], user_message="Write a long story about a dragon.",
                         sampling=Sampling(temperature=0.7, max_tokens=200), stop=stop)
    deltas = 0
    for event in stream:
        if event.kind == "delta":
            deltas += 1
            if deltas == 3:
                stop.set()
        if event.kind == "done":
            out = event.outcome
    assert out.finish_reason == "stopped" and out.completion_tokens <= 5
    engine.flush()
    assert engine.store.get_turn(out.turn_id)["sampling"]["finish_reason"] == "stopped"
    assert not stop.is_set()  # cleared, so the next answer is not cut short


def test_an_abandoned_stream_is_logged_and_releases_the_model(engine):
    stream = engine.chat(conversation_id=None, history=[], user_message="Tell me about cats.",
                         sampling=Sampling(temperature=0.7, max_tokens=100))
    next(stream)
    next(stream)
    served = engine._served
    assert served.model.lock.locked() and served.users == 1
    stream.close()  # what Gradio does when the browser goes away mid-answer
    assert not served.model.lock.locked() and served.users == 0
    engine.flush()
    (turn,) = list(engine.store.iter_turns())
    assert turn["sampling"]["finish_reason"] == "abandoned" and turn["completion_tokens"] >= 1


def test_hot_swap_next_request_gets_the_new_version_while_a_stream_finishes_on_the_old(engine, registry, register_copy,
                                                                                       monkeypatch):
    closed = []
    from app.generation import ChatModel

    original_close = ChatModel.close
    monkeypatch.setattr(ChatModel, "close", lambda self: (closed.append(self.name), original_close(self)))
    v2 = register_copy()
    old_stream = engine.chat(conversation_id=None, history=[], user_message="Count from one to twenty in words.",
                             sampling=Sampling(temperature=0.0, max_tokens=40))
    start = next(old_stream)
    assert start.version_id == "v1"
    first_delta = next(old_stream)
    old = engine._served

    registry.promote(v2, reason="test: hot-swap")  # while v1 is mid-stream
    new_events = run(engine.chat(conversation_id=None, history=[], user_message="Hi!",
                                 sampling=Sampling(temperature=0.0, max_tokens=6)))
    assert new_events[0].version_id == v2 and new_events[-1].outcome.version_id == v2
    assert old.retired and old.users == 1 and closed == []  # kept alive for the stream in flight

    rest = list(old_stream)
    out = rest[-1].outcome
    assert out.version_id == "v1" and out.finish_reason in ("stop", "length") and out.completion_tokens > 3
    assert out.answer == (first_delta.text + "".join(e.text for e in rest if e.kind == "delta")).strip()
    engine.flush()
    assert engine.store.get_turn(out.turn_id)["model_version"] == "v1"
    assert closed == ["v1"] and old.model.llama._ctx.ctx is None  # freed once its last stream ended
    assert engine.status()["version"] == v2


def test_missing_model_keeps_the_app_up_and_recovers(loop_home, registry, register_copy):
    Engine(load_config()).close()  # bootstrap: v1 registered and current
    registry.current().gguf_path.unlink()  # the served file disappears before the app starts
    eng = Engine(load_config())
    try:
        assert eng.status()["version"] is None and "not found" in eng.status()["error"]
        with pytest.raises(ModelUnavailable, match="unavailable"):
            next(eng.chat(conversation_id=None, history=[], user_message="Hello?"))
        v2 = register_copy()
        registry.promote(v2, reason="test: a good version")
        events = run(eng.chat(conversation_id=None, history=[], user_message="Hello?",
                              sampling=Sampling(temperature=0.0, max_tokens=4)))
        assert events[-1].outcome.version_id == v2 and eng.status()["error"] is None
    finally:
        eng.close()


def test_unloadable_new_version_keeps_serving_the_old_one_with_a_notice(engine, registry, register_copy):
    bad = register_copy(corrupt=True)
    registry.promote(bad, reason="test: a broken file")
    events = run(engine.chat(conversation_id=None, history=[], user_message="Hi",
                             sampling=Sampling(temperature=0.0, max_tokens=4)))
    assert events[0].version_id == "v1"
    assert any(f"{bad} is current but cannot be served" in n for n in events[0].notices)
    good = register_copy()
    registry.promote(good, reason="test: fixed")
    assert run(engine.chat(conversation_id=None, history=[], user_message="Hi",
                           sampling=Sampling(temperature=0.0, max_tokens=4)))[0].version_id == good


def test_a_10_mb_system_prompt_is_refused_at_once_and_never_reaches_the_model(engine, monkeypatch):
    def no_model(*_a, **_k):
        raise AssertionError("the model was asked with an oversized system prompt")

    monkeypatch.setattr(engine, "_acquire", no_model)
    started = time.perf_counter()
    with pytest.raises(InputRejected, match=r"system prompt is 10,485,760 characters; the limit is 8,000"):
        next(engine.chat(conversation_id=None, history=[], user_message="Hi", system_prompt="x" * (10 * 2**20)))
    assert time.perf_counter() - started < 2.0
    engine.flush()
    assert engine.store.count_turns() == 0


def test_the_system_prompt_is_cleaned_like_a_message(engine):
    events = run(engine.chat(conversation_id=None, history=[], user_message="Name a colour.",
                             system_prompt="  Answer\x00 in one word.\x1b \n", sampling=Sampling(max_tokens=4)))
    assert events[-1].outcome.messages[0] == {"role": "system", "content": "Answer in one word."}
