"""The input policy: empty and oversized messages, and history beyond the model's context."""

from __future__ import annotations

import pytest

from app.policy import MIN_ANSWER_TOKENS, InputRejected, clean_message, fit_history, history_pairs


def words(messages):
    """A stand-in token counter for the pure tests: one token per word plus 4 per message."""
    return sum(len(m["content"].split()) + 4 for m in messages)


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", None, "\x00\x07"])
def test_empty_messages_are_refused(text):
    with pytest.raises(InputRejected, match="empty message"):
        clean_message(text, 100)


def test_oversized_message_is_refused_with_the_limit():
    with pytest.raises(InputRejected, match=r"101 characters; the limit is 100"):
        clean_message("x" * 101, 100)
    assert clean_message("x" * 100, 100) == "x" * 100


def test_control_characters_are_removed_and_newlines_kept():
    assert clean_message("  a\x00b\x1b[31m\nc\td  ", 100) == "ab[31m\nc\td"


def test_history_pairs_skip_out_of_step_messages():
    h = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "a"},
         {"role": "assistant", "content": "stray"},
         {"role": "user", "content": "2"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "tail"}]
    assert [(u["content"], a["content"]) for u, a in history_pairs(h)] == [("1", "a"), ("2", "b")]


def _history(n):
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"question {i} " + "w " * 20},
                {"role": "assistant", "content": f"answer {i} " + "w " * 20}]
    return out


def test_history_that_fits_is_kept_whole():
    fitted = fit_history("sys", _history(2), "new", words, n_ctx=1000, max_tokens=100)
    assert fitted.dropped_turns == 0
    assert [m["role"] for m in fitted.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert fitted.messages[-1]["content"] == "new" and fitted.prompt_tokens == words(fitted.messages)


def test_oldest_turns_are_dropped_first_and_system_and_new_message_kept():
    hist = _history(10)  # each pair ~ 52 "tokens"
    fitted = fit_history("sys", hist, "new", words, n_ctx=300, max_tokens=100)
    assert fitted.dropped_turns > 0
    assert fitted.prompt_tokens + 100 <= 300
    kept = [m["content"] for m in fitted.messages if m["role"] == "user"][:-1]
    assert kept[0].startswith(f"question {fitted.dropped_turns} ")  # the oldest kept is right after the dropped
    assert kept[-1].startswith("question 9 ")  # the newest exchange survives
    assert fitted.messages[0] == {"role": "system", "content": "sys"}
    # dropping one fewer would not have fitted
    assert words(fit_history("sys", hist[2 * (fitted.dropped_turns - 1):], "new", words, 10_000, 0).messages) + 100 > 300


def test_answer_budget_shrinks_then_the_message_is_refused():
    fitted = fit_history(None, [], "w " * 40, words, n_ctx=80, max_tokens=100)  # 44 tokens of prompt
    assert fitted.max_tokens == 80 - 44 and fitted.max_tokens >= MIN_ANSWER_TOKENS
    with pytest.raises(InputRejected, match="too long for the model"):
        fit_history(None, [], "w " * 70, words, n_ctx=80, max_tokens=100)


def test_fit_history_with_the_real_tokenizer(shared_chat_model):
    """Counting with the Llama tokenizer: what is kept really fits the context."""
    model = shared_chat_model
    hist = _history(30)
    n_ctx = 512
    fitted = fit_history("Be brief.", hist, "And now?", model.count_tokens, n_ctx=n_ctx, max_tokens=128)
    assert fitted.dropped_turns > 0
    assert len(model.prompt_tokens(fitted.messages)) == fitted.prompt_tokens <= n_ctx - 128
    # The rendered prompt uses the GGUF's own chat template (ChatML for SmolLM2).
    assert model.render(fitted.messages).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_system_prompt_over_the_limit_is_refused_and_empty_means_none():
    from app.policy import clean_system_prompt

    with pytest.raises(InputRejected, match=r"system prompt is 101 characters; the limit is 100"):
        clean_system_prompt("x" * 101, 100)
    assert clean_system_prompt(None, 100) == clean_system_prompt("  \n", 100) == ""
    assert clean_system_prompt(" Be\x00 brief. ", 100) == "Be brief."
