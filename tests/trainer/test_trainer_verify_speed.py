"""How `verify_gguf` decodes the probes, on the real SmolLM2-135M: the merged model answers every probe in one
batched `generate`, and llama.cpp decodes free-running only the probes where, teacher-forced along the merged
answer, its argmax leaves that answer. The pair is the bundled Q4_1 GGUF and the HF weights derived from it (the
session fixtures `bundled_gguf` and `base_hf_dir`): on the full probe set it follows the merged answer on some
probes and leaves it on others, so both branches are exercised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from trainer import verify
from trainer.export_config import VerifyConfig
from trainer.verify import (
    _forced_logits,
    _GgufSide,
    _HfSide,
    _torch_threads,
    load_probes,
    probe_prompt_messages,
    probes_as_examples,
    prompt_ids,
    stop_token_ids,
    verify_gguf,
)

pytestmark = pytest.mark.slow

PROBES = load_probes()  # the full fixed set, as a cycle's export verifies it
EXAMPLES = probes_as_examples(PROBES)[:2]
CONFIG = VerifyConfig()
THREADS = CONFIG.resolved_threads()
# llama.cpp scores a sequence at once and a token at a time with different rounding (about 0.1 logit measured on
# this file); a free-running answer may leave a followed merged answer only at a near-tie that close.
NEAR_TIE = 0.25


@dataclass
class Run:
    result: verify.VerificationResult
    hf_batches: list[int] = field(default_factory=list)  # batch size of every forward pass of the merged model
    gguf_decoded: list[list[int]] = field(default_factory=list)  # prompts llama.cpp decoded free-running


@pytest.fixture(scope="module")
def run(bundled_gguf, base_hf_dir) -> Run:
    """One verification of the bundled GGUF against its HF weights, its forward passes and decodes recorded."""
    spy = Run(result=None)
    hf_init, gguf_greedy = _HfSide.__init__, _GgufSide.greedy

    def recording_init(self, merged_dir):
        hf_init(self, merged_dir)

        def record(_module, args, kwargs):
            ids = kwargs.get("input_ids")
            spy.hf_batches.append(int((ids if ids is not None else args[0]).shape[0]))

        self.model.register_forward_pre_hook(record, with_kwargs=True)

    def recording_greedy(self, ids, n, stops):
        spy.gguf_decoded.append(list(ids))
        return gguf_greedy(self, ids, n, stops)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_HfSide, "__init__", recording_init)
        mp.setattr(_GgufSide, "greedy", recording_greedy)
        spy.result = verify_gguf(bundled_gguf, base_hf_dir, PROBES, EXAMPLES, CONFIG)
    assert spy.result.load_ok and len(spy.result.probe_details) == len(PROBES), spy.result.reasons
    return spy


@pytest.fixture(scope="module")
def prompts(base_hf_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_hf_dir))
    return [prompt_ids(tokenizer, probe_prompt_messages(p)) for p in PROBES]


@pytest.fixture(scope="module")
def stops(base_hf_dir) -> set[int]:
    from transformers import AutoTokenizer

    return stop_token_ids(AutoTokenizer.from_pretrained(str(base_hf_dir)))


def test_the_merged_models_probe_answers_are_decoded_in_one_batch_and_match_one_at_a_time_decoding(
        run, prompts, stops, base_hf_dir):
    # One teacher-forced pass per probe and per held-out example, each on its own; every other pass carries all the
    # probes at once, one pass per answer token at most (a one-at-a-time decode is 20+ passes of batch 1).
    singles = [b for b in run.hf_batches if b == 1]
    batched = [b for b in run.hf_batches if b != 1]
    assert len(singles) == len(PROBES) + len(EXAMPLES), run.hf_batches
    assert batched and set(batched) == {len(PROBES)} and len(batched) <= CONFIG.probe_tokens, run.hf_batches

    # Each row is what the one-at-a-time loop writes: no padding, at most `probe_tokens` tokens, the stop token kept.
    with _torch_threads(THREADS):
        hf = _HfSide(base_hf_dir)
        reference = [hf.greedy(ids, CONFIG.probe_tokens, stops) for ids in prompts]
    answers = [d["hf_ids"] for d in run.result.probe_details]
    assert answers == reference
    assert any(a[-1] in stops for a in answers) and any(len(a) == CONFIG.probe_tokens for a in answers)


def test_probe_answers_decoded_in_several_batches_equal_those_decoded_in_one(prompts, stops, base_hf_dir,
                                                                             monkeypatch):
    with _torch_threads(THREADS):
        hf = _HfSide(base_hf_dir)
        whole = hf.greedy_batch(prompts[:7], CONFIG.probe_tokens, stops)
        monkeypatch.setattr(verify, "_PROBE_BATCH", 3)
        chunked = hf.greedy_batch(prompts[:7], CONFIG.probe_tokens, stops)
    assert chunked == whole and len(whole) == 7


def test_the_gguf_decodes_free_running_only_the_probes_its_forced_argmax_disagrees_on(run, prompts, stops,
                                                                                      bundled_gguf):
    details = run.result.probe_details
    gguf = _GgufSide(bundled_gguf, 512, THREADS)
    try:
        forced = [_forced_logits(gguf, ids, d["hf_ids"]) for ids, d in zip(prompts, details)]
        follows = [bool(np.array_equal(f.argmax(axis=1), d["hf_ids"])) for f, d in zip(forced, details)]
        free_running = [gguf.greedy(ids, CONFIG.probe_tokens, stops) for ids in prompts]
    finally:
        gguf.close()
    assert any(follows) and not all(follows), follows  # both kinds of probe, or this test shows nothing

    assert run.gguf_decoded == [ids for ids, f in zip(prompts, follows) if not f]
    for d, f, real, logits in zip(details, follows, free_running, forced):
        if not f:  # decoded: the free-running answer itself
            assert d["gguf_ids"] == real and d["exact"] == (real == d["hf_ids"]), d
            continue
        assert d["gguf_ids"] == d["hf_ids"] and d["exact"], d
        if real != d["hf_ids"]:  # a token-at-a-time decode may flip a near-tie the forced pass scored
            at = next(i for i, (a, b) in enumerate(zip(real, d["hf_ids"])) if a != b)
            top2 = np.sort(logits[at])[-2:]
            assert top2[1] - top2[0] < NEAR_TIE, (d["prompt"], at, top2)
    exact = [d["gguf_ids"] == d["hf_ids"] for d in details]
    assert run.result.exact_agreement == round(sum(exact) / len(exact), 4)
