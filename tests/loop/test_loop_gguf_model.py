"""The one llama.cpp wrapper (loop.core.gguf_model), on the real bundled SmolLM2 GGUF.

The chat, the probes and the arena must see the same token ids and decode the same way: a greedy
probe answer is what a user would get from the chat at temperature 0.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from app.generation import ChatModel, Sampling, StreamStats
from app.probe_runner import greedy_answer
from loop.core.errors import LoopError
from loop.core.gguf_model import GgufModel, ModelLoadError, argmax, open_llama

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model(bundled_gguf):
    loaded = ChatModel.load(bundled_gguf, n_ctx=512, name="bundled")
    yield loaded
    loaded.close()


def test_a_missing_file_is_a_model_load_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ModelLoadError, match="nowhere.gguf"):
        open_llama(missing, n_ctx=64)
    with pytest.raises(ModelLoadError, match="nowhere.gguf"):
        GgufModel.load(missing, n_ctx=64)


@pytest.mark.parametrize("content", [b"this is not a model" * 100, b"GGUF" + b"\0" * 4096])
def test_an_unloadable_file_is_a_model_load_error_naming_it(tmp_path, content):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(content)
    with pytest.raises(ModelLoadError, match="could not load garbage.gguf") as caught:
        GgufModel.load(garbage, n_ctx=64)
    assert isinstance(caught.value, LoopError) and isinstance(caught.value, RuntimeError)


def test_weights_load_without_llama_cpps_extra_buffer_types(bundled_gguf):
    llama = open_llama(bundled_gguf, n_ctx=64)
    try:
        assert llama.model_params.use_extra_bufts is False  # its AMX layout segfaults on recent Intel CPUs
    finally:
        llama.close()


def test_a_fresh_process_decodes_the_bundled_gguf_on_this_cpu(bundled_gguf):
    # In a child: on a CPU with AMX, llama.cpp's AMX weight layout ended the process with SIGSEGV at
    # the first decode, which would take the whole test run (and the app) down with it.
    program = ("import sys\n"
               "from app.probe_runner import greedy_answer\n"
               "from loop.core.gguf_model import GgufModel\n"
               "model = GgufModel.load(sys.argv[1], n_ctx=256)\n"
               "print(greedy_answer(model, [{'role': 'user', 'content': 'What is the capital of France?'}], 16).answer)\n")
    done = subprocess.run([sys.executable, "-c", program, str(bundled_gguf)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip()  # an answer, whatever the small model says


def test_greedy_decode_is_the_probe_runners_answer_and_the_chats_greedy_stream(model):
    prompt = model.prompt_tokens(QUESTION)
    # The chat first, on a fresh context: it reuses cached prefixes, which must not change what it says.
    stats = StreamStats()
    with model.lock:
        chat = list(model.stream(prompt, Sampling(temperature=0.0, max_tokens=24, seed=0), stats))
        steps = list(model.decode(prompt, 24, argmax))
    probe = greedy_answer(model, QUESTION, max_tokens=24)

    answer = [s.token for s in steps if not s.end]
    assert len(answer) >= 4
    assert [s.token for s in chat] == answer
    assert [s.logprob for s in chat] == pytest.approx([s.logprob for s in steps if not s.end], abs=1e-4)
    assert probe.answer == model.text(answer).strip() and probe.n_tokens == len(answer)
    assert probe.finished == steps[-1].end == (stats.finish_reason == "stop")
    assert probe.mean_logprob == pytest.approx(sum(s.logprob for s in steps) / len(steps), abs=1e-6)


def test_a_control_string_in_a_message_is_tokenised_as_text(model):
    llama = model.llama
    (im_end,) = llama.tokenize(b"<|im_end|>", add_bos=False, special=True)
    typed = [{"role": "user", "content": "Hi<|im_end|>there"}]
    plain = [{"role": "user", "content": "Hi there"}]
    tokens = model.prompt_tokens(typed)
    assert tokens.count(im_end) == model.prompt_tokens(plain).count(im_end)  # only the template's own
    as_text = llama.tokenize(b"<|im_end|>", add_bos=False, special=False)
    assert len(as_text) > 1
    assert any(tokens[i:i + len(as_text)] == as_text for i in range(len(tokens)))


def test_decoding_needs_the_models_lock(model):
    with pytest.raises(RuntimeError, match="lock"):
        next(iter(model.decode(model.prompt_tokens(QUESTION), 2)))


def test_the_lock_is_per_model(model, bundled_gguf):
    other = GgufModel.load(bundled_gguf, n_ctx=256, name="other")
    try:
        assert other.lock is not model.lock
        answers: dict[str, str] = {}

        def ask(name: str, which: GgufModel) -> None:
            answers[name] = greedy_answer(which, QUESTION, max_tokens=2).answer

        with model.lock:  # someone is streaming from `model`
            blocked = threading.Thread(target=ask, args=("same", model))
            free = threading.Thread(target=ask, args=("other", other))
            blocked.start()
            free.start()
            free.join(60)
            assert not free.is_alive() and "other" in answers  # another model never waits
            blocked.join(0.5)
            assert blocked.is_alive() and "same" not in answers  # the same model waits for its lock
        blocked.join(60)
        assert answers["same"] == answers["other"]
    finally:
        other.close()
