"""Export and verification on the real SmolLM2-135M model: HF -> GGUF parity, a LoRA merge that shows in the GGUF,
a file that will not load, and a quantisation that loses too much.

Needs the converter installed by setup (`python -m trainer.install_converter` into $LOOP_TOOLS).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from trainer import install_converter
from trainer.data import tokenize_example
from trainer.export import ExportResult, export_variant, sha256_file
from trainer.export_config import ExportConfig, VerifyConfig
from trainer.gguf_convert import quantize_gguf
from trainer.verify import (
    _GgufSide,
    _HfSide,
    _torch_threads,
    load_probes,
    probe_prompt_messages,
    probes_as_examples,
    prompt_ids,
    verify_gguf,
)

pytestmark = pytest.mark.slow

# A subset keeps the suite inside its CI budget; the full fixed set is what `export_variant` uses by default.
PROBES = load_probes()[:8]
EXAMPLES = probes_as_examples(load_probes())[:10]


@pytest.fixture(scope="module")
def converter_dir() -> Path:
    path = install_converter.default_converter_dir()
    assert install_converter.is_installed(path), (
        f"the llama.cpp converter is not installed in {path}: run `python -m trainer.install_converter` (setup)"
    )
    return path


@pytest.fixture(scope="module")
def base_export(base_hf_dir, converter_dir, tmp_path_factory) -> ExportResult:
    """The bundled base itself through HF -> GGUF f32 -> Q8_0, verified (the parity run)."""
    out = tmp_path_factory.mktemp("base-export")
    config = ExportConfig(quantization="Q8_0", keep_intermediate=True)
    card_info = {"base_model": "SmolLM2-135M-Instruct", "parent_version": None,
                 "data": {"snapshot_hash": "none", "n_train": 0, "n_eval": len(EXAMPLES)}}
    return export_variant(None, base_hf_dir, out, config, card_info, probes=PROBES, eval_examples=EXAMPLES)


def _tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def test_the_embedding_and_lm_head_take_the_asked_type_and_the_rest_the_quantisation(base_export, tmp_path):
    # By default llama.cpp's choice for Q8_0 rounds the embedding too; SmolLM2 ties it to the LM head.
    types = _tensor_types(base_export.gguf_path)
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
    card = json.loads((base_export.card_path.parent / "card.json").read_text())
    assert card["export"]["embedding_type"] == "default"
    mixed = quantize_gguf(base_export.intermediate_path, tmp_path / "mixed.gguf", "Q8_0", embedding_type="f16")
    types = _tensor_types(mixed)
    assert types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_q.weight"] == types["blk.29.ffn_down.weight"] == "Q8_0"


THREADS = VerifyConfig().resolved_threads()


def _last_logits(side, ids) -> np.ndarray:
    with _torch_threads(THREADS):
        return side.logits(ids)[-1].astype(np.float64)


def test_base_export_parity(base_export, base_hf_dir):
    result = base_export
    ver = result.verification
    assert ver is not None and ver.passed, ver.reasons
    assert ver.load_ok and ver.tokenizer_agreement == 1.0 and ver.chat_template_match and ver.quantization == "Q8_0"
    assert ver.agreement >= 0.8
    assert ver.loss_delta is not None and ver.loss_delta < 0.05
    assert 0.5 < ver.hf_eval_loss < 5.0 and ver.n_eval_tokens > 100
    assert len(ver.probe_details) == len(PROBES)

    # The file, its hash and size, and the card beside it.
    assert result.gguf_path.name == "model-Q8_0.gguf" and result.quantization == "Q8_0"
    assert result.sha256 == hashlib.sha256(result.gguf_path.read_bytes()).hexdigest() == sha256_file(result.gguf_path)
    assert result.size_bytes == result.gguf_path.stat().st_size
    assert 100 * 2**20 < result.size_bytes < 200 * 2**20  # ~138 MiB at 8.5 bits/weight for 135M parameters
    card = json.loads((result.card_path.parent / "card.json").read_text())
    assert card["gguf"]["sha256"] == result.sha256 and card["quantization"] == "Q8_0"
    assert card["verification"]["passed"] is True and card["base_model"] == "SmolLM2-135M-Instruct"
    assert "## Verification" in result.card_path.read_text()
    assert result.merged_dir == base_hf_dir  # an adapter-less export uses the base as it is

    # The unquantised conversion is exact: llama.cpp's f32 logits equal transformers' on the same token ids.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_hf_dir))
    ids = prompt_ids(tok, probe_prompt_messages(PROBES[0]))
    gguf = _GgufSide(result.intermediate_path, 256, THREADS)
    try:
        f32_logits = _last_logits(gguf, ids)
    finally:
        gguf.close()
    hf_logits = _last_logits(_HfSide(base_hf_dir), ids)
    assert np.abs(f32_logits - hf_logits).max() < 0.1


def test_loss_mask_covers_exactly_the_answer(base_hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_hf_dir))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]
    example = tokenize_example(tok, messages, 1024, answers="all")  # the verifier's held-out loss mask
    answer_text = tok.decode([t for t, m in zip(example.input_ids, example.completion_mask) if m])
    assert answer_text == "Hello there.<|im_end|>\nGoodbye!<|im_end|>\n"


def _random_lora_adapter(base_hf_dir: Path, out: Path) -> Path:
    """A LoRA adapter whose B matrices are random (PEFT initialises them to zero, which would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base_hf_dir), dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base_hf_dir)).save_pretrained(str(out))
    return out


def test_lora_merge_reaches_the_gguf(base_export, base_hf_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    adapter = _random_lora_adapter(base_hf_dir, tmp_path / "adapter")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())

    result = export_variant(adapter, base_hf_dir, tmp_path / "export", ExportConfig(quantization="Q8_0"),
                            {"base_model": "SmolLM2-135M-Instruct", "variant": {"rank": 8}},
                            probes=PROBES[:4], eval_examples=EXAMPLES[:4])
    assert result.merged_dir == tmp_path / "export" / "merged"
    assert (result.merged_dir / "model.safetensors").is_file()
    assert result.verification.passed, result.verification.reasons  # the merged GGUF matches the merged model
    assert result.sha256 != base_export.sha256

    # The change shows in llama.cpp's log-probabilities, well above Q8_0's own rounding noise, and it is the merged
    # model's change: the merged GGUF sits closer to the merged HF model than to the base.
    tok = AutoTokenizer.from_pretrained(str(base_hf_dir))
    prompts = [prompt_ids(tok, probe_prompt_messages(p)) for p in PROBES[:3]]
    sides = {"gguf_base": _GgufSide(base_export.gguf_path, 256, THREADS),
             "gguf_merged": _GgufSide(result.gguf_path, 256, THREADS),
             "hf_base": _HfSide(base_hf_dir), "hf_merged": _HfSide(result.merged_dir)}
    try:
        logp = {name: [_log_softmax(_last_logits(side, ids)) for ids in prompts] for name, side in sides.items()}
    finally:
        sides["gguf_base"].close()
        sides["gguf_merged"].close()

    def dist(a: str, b: str) -> float:
        return float(np.mean([np.abs(x - y).mean() for x, y in zip(logp[a], logp[b])]))

    noise = dist("gguf_base", "hf_base")
    assert dist("gguf_merged", "gguf_base") > 3 * noise, (dist("gguf_merged", "gguf_base"), noise)
    assert dist("gguf_merged", "hf_merged") < dist("gguf_merged", "hf_base") / 2


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_unloadable_gguf_is_refused_with_a_reason(base_export, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a model" * 100)
    ver = verify_gguf(garbage, base_export.merged_dir, PROBES[:2], EXAMPLES[:2])
    assert not ver.passed and not ver.load_ok
    assert "not a GGUF file" in ver.reasons[0]

    truncated = tmp_path / "truncated.gguf"
    with open(base_export.gguf_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(base_export.size_bytes // 2))
    for in_child in (True, False):  # the child-process check, and the in-process load behind it
        ver = verify_gguf(truncated, base_export.merged_dir, PROBES[:2], EXAMPLES[:2],
                          VerifyConfig(load_check_subprocess=in_child))
        assert not ver.passed and not ver.load_ok
        assert "could not load truncated.gguf" in ver.reasons[0], ver.reasons


def test_quantisation_that_degrades_too_much_fails(base_export, tmp_path):
    # Q2_K judged by the Q8_0 gate: the drift it brings is far beyond what Q8_0 is allowed.
    q2 = quantize_gguf(base_export.intermediate_path, tmp_path / "model-Q2_K.gguf", "Q2_K")
    ver = verify_gguf(q2, base_export.merged_dir, PROBES, EXAMPLES, VerifyConfig(), quantization="Q8_0")
    assert ver.load_ok and not ver.passed
    assert ver.loss_delta > 0.05 and ver.agreement < 0.8
    assert any("probe agreement" in r for r in ver.reasons)
    assert any("held-out loss" in r and "above the tolerance" in r for r in ver.reasons)
    # Q2_K also chooses other tokens than the merged model along the held-out answers: nothing clears its loss gap.
    assert ver.eval_agreement < VerifyConfig().min_eval_agreement, ver.eval_agreement

    # Without a named quantisation the file's own (read from its metadata) picks the thresholds.
    ver = verify_gguf(q2, base_export.merged_dir, PROBES[:1], EXAMPLES[:1])
    assert ver.quantization == "Q2_K"
    assert (ver.min_agreement, ver.max_loss_rel_delta) == VerifyConfig().thresholds("Q2_K")

    # And a tolerance tighter than any real quantisation refuses even the good Q8_0 file, saying why ...
    strict = VerifyConfig(max_loss_rel_delta=1e-6, max_loss_abs_delta=0.0, min_agreement=0.0, min_eval_agreement=1.0,
                          tie_margin=0.0)
    ver = verify_gguf(base_export.gguf_path, base_export.merged_dir, PROBES[:2], EXAMPLES[:4], strict)
    assert ver.load_ok and not ver.passed
    assert len(ver.reasons) == 1 and "above the tolerance of 1e-06" in ver.reasons[0]
    # ... unless the gap is within the absolute floor: a tiny gap on a small loss is rounding, not breakage.
    floored = VerifyConfig(max_loss_rel_delta=1e-6, min_agreement=0.0, min_eval_agreement=1.0, tie_margin=0.0)
    ver = verify_gguf(base_export.gguf_path, base_export.merged_dir, PROBES[:2], EXAMPLES[:4], floored)
    assert 0 < abs(ver.loss_abs_delta) <= floored.max_loss_abs_delta and ver.loss_delta > 1e-6
    assert ver.eval_agreement < 1.0
    assert ver.passed, ver.reasons


def test_a_loss_gap_beyond_both_bounds_passes_when_the_file_picks_the_merged_models_tokens(base_export):
    """A sharply fine-tuned model can lose more to Q8_0 rounding than both loss bounds allow on a held-out set of two
    or three examples while the file still chooses, token by token, what the merged model chooses. Agreement along
    the held-out answers clears the gap; the same gap with the agreement bar out of reach, or beyond what agreement
    may clear, is refused, saying so."""
    bounds_exceeded = VerifyConfig(max_loss_rel_delta=1e-6, max_loss_abs_delta=0.0, min_agreement=0.8)
    ver = verify_gguf(base_export.gguf_path, base_export.merged_dir, PROBES[:2], EXAMPLES[:4], bounds_exceeded)
    assert ver.loss_delta > 1e-6 and abs(ver.loss_abs_delta) > 0.0
    assert ver.eval_agreement >= bounds_exceeded.min_eval_agreement == ver.min_eval_agreement
    assert ver.passed, ver.reasons

    out_of_reach = VerifyConfig(max_loss_rel_delta=1e-6, max_loss_abs_delta=0.0, min_agreement=0.0,
                                min_eval_agreement=1.0, tie_margin=0.0)
    ver = verify_gguf(base_export.gguf_path, base_export.merged_dir, PROBES[:2], EXAMPLES[:4], out_of_reach)
    assert not ver.passed and ver.eval_agreement < 1.0
    assert any("along the held-out answers" in r and "(the bar is 100%)" in r for r in ver.reasons), ver.reasons

    # Agreement vouches only for a bounded gap: the same top tokens under a much larger gap are other probabilities.
    capped = VerifyConfig(max_loss_rel_delta=1e-6, max_loss_abs_delta=0.0, min_agreement=0.0,
                          max_agreeing_loss_abs_delta=0.0)
    ver = verify_gguf(base_export.gguf_path, base_export.merged_dir, PROBES[:2], EXAMPLES[:4], capped)
    assert not ver.passed and ver.eval_agreement >= capped.min_eval_agreement
    assert any("beyond the 0 that agreement can clear" in r for r in ver.reasons), ver.reasons
