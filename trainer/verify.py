"""Verify a quantised GGUF against the merged Hugging Face model it came from, before anything promotes it.

The gate is on the quantised file itself (quality lost in conversion is a known trap): the file must load in
llama-cpp-python; on a fixed probe set its greedy continuations must agree with the merged model's; and its held-out
loss, computed from llama.cpp's own logits, must stay within a tolerance of the loss transformers computes on the
very same token ids. Both sides see identical inputs: every prompt and example is rendered with the merged model's
chat template and tokenised once by its HF tokenizer; those ids go to both models.

The probes' greedy answers. The merged model answers every probe at once (left-padded batches, transformers'
`generate`, plain argmax: no setting of the checkpoint's generation config applies); a row stops at its first stop
token, kept, or after `probe_tokens` tokens, and never carries padding. Batched answers can differ from
one-at-a-time decoding by float rounding on a near-tie; the gate holds either way, since both models are then
teacher-forced along the same answers. The GGUF's free-running answer is reported, never gated (`exact_agreement`,
each probe's `gguf_ids`/`gguf_text`). Teacher-forced along the merged answer, llama.cpp's argmax is the answer's
next token at every position exactly when greedy decoding in llama.cpp writes that answer token for token and stops
where it stops, up to llama.cpp's own rounding: scoring a sequence at once and a token at a time can differ by about
0.1 logit on a quantised file, which flips a near-tie now and then. Such a probe's GGUF answer is the merged answer;
only the other probes are decoded free-running in llama.cpp.

A file that will not load gives `passed=False` with the reason; no exception from loading escapes `verify_gguf`.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loop.core.chat_template import Segment, hf_chat_ids, hf_chat_segments, llama_segment_ids
from loop.core.gguf_model import ModelLoadError, open_llama
from loop.core.probes import PROBES_FILE as PROBES_PATH
from trainer.data import tokenize_example
from trainer.export_config import ExportConfig, VerifyConfig

# Probes the merged model answers in one `generate` call (left-padded to the batch's longest prompt).
_PROBE_BATCH = 32

# End-of-turn markers of common chat templates; generation stops at any that exist in the vocabulary.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>", "<|endoftext|>")


@dataclass
class VerificationResult:
    """Outcome of `verify_gguf`. `passed` is the gate; `reasons` lists every check that failed (empty on a pass)."""

    passed: bool
    reasons: list[str]
    load_ok: bool
    # Gated: fraction of probes on which, along the merged model's greedy answer, llama.cpp's top token at each of the
    # first `probe_tokens` positions is the merged model's top token or within `tie_margin` logits of it.
    agreement: float | None = None
    # Reported: fraction of probes whose free-running greedy answers have identical first `probe_tokens` token ids
    # (the GGUF's answer is the merged one wherever its forced argmax follows that answer: see the module docstring).
    exact_agreement: float | None = None
    # Reported: fraction of all teacher-forced positions where both models' top token is the same.
    token_agreement: float | None = None
    # Per probe: prompt, both free-running answers (ids and text), exact/tie-tolerant agreement, the largest logit gap.
    probe_details: list[dict] = field(default_factory=list)
    # Mean cross-entropy (nats/token) over assistant tokens of the held-out examples, from each side's logits.
    gguf_eval_loss: float | None = None
    hf_eval_loss: float | None = None
    # Relative loss delta |gguf - hf| / hf, the gated figure; loss_abs_delta is gguf - hf (signed).
    loss_delta: float | None = None
    loss_abs_delta: float | None = None
    # Gated with the loss: fraction of held-out answer positions where llama.cpp's top token is one the merged model
    # scores within `tie_margin` logits of its own top token. Loss bounds or this agreement: either clears the check.
    eval_agreement: float | None = None
    min_eval_agreement: float | None = None
    n_eval_examples: int = 0
    n_eval_tokens: int = 0
    # Fraction of probe prompts that llama.cpp's tokenizer (the one the app serves with) tokenises exactly as the HF
    # tokenizer does; a mismatch means the served model would see other inputs than the ones verified.
    tokenizer_agreement: float | None = None
    # Whether the GGUF carries a chat template identical to the merged model's (the app formats chats with it).
    chat_template_match: bool | None = None
    # Thresholds in force (after defaults for the quantisation were filled in) and the measure, for the report.
    min_agreement: float | None = None
    max_loss_rel_delta: float | None = None
    probe_tokens: int = 0
    tie_margin: float | None = None
    quantization: str | None = None
    load_error: str | None = None
    duration_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- probes and examples


def load_probes(path: Path | None = None) -> list[dict]:
    """The fixed probe set: one JSON object a line with "prompt" and, optionally, a reference "answer"."""
    path = Path(path) if path else PROBES_PATH
    probes = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    probes.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
    return probes


def example_messages(example: Any) -> list[dict]:
    """Chat messages of a training/eval example: {"messages": [...]}, {"prompt", "response"|"completion"|"answer"},
    or a bare list of {"role", "content"} dicts."""
    if isinstance(example, list):
        return example
    if isinstance(example, dict):
        if "messages" in example:
            return list(example["messages"])
        if "prompt" in example:
            messages = [{"role": "user", "content": example["prompt"]}]
            for key in ("response", "completion", "answer"):
                if example.get(key):
                    messages.append({"role": "assistant", "content": example[key]})
                    break
            return messages
    raise ValueError(f"cannot read chat messages from example {str(example)[:120]!r}")


def probe_prompt_messages(probe: str | dict) -> list[dict]:
    """The messages a probe asks with (its reference answer, if any, dropped)."""
    if isinstance(probe, str):
        return [{"role": "user", "content": probe}]
    messages = example_messages(probe)
    while messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages:
        raise ValueError(f"probe {probe!r} has no prompt")
    return messages


def probes_as_examples(probes: Iterable[dict]) -> list[dict]:
    """Probes that carry a reference answer, as chat examples (the fallback held-out set)."""
    return [{"messages": example_messages(p)} for p in probes if isinstance(p, dict) and p.get("answer")]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    # Markup with its special tokens, message text never parsed for them: the app's tokenisation (loop.core.chat_template).
    return hf_chat_ids(tokenizer, messages, add_generation_prompt=True)


def stop_token_ids(tokenizer) -> set[int]:
    stops = set()
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    stops.update(int(vocab[t]) for t in _END_OF_TURN_TOKENS if t in vocab)
    return stops


def _forced_logits(side, prompt: Sequence[int], answer: Sequence[int]) -> np.ndarray:
    """Logits predicting each answer token, with the prompt and the answer so far as input (teacher forcing)."""
    ids = list(prompt) + list(answer)
    return side.logits(ids)[len(prompt) - 1: len(ids) - 1]


def _follows(forced: np.ndarray, answer: Sequence[int]) -> bool:
    """Whether greedy decoding writes `answer`, given `_forced_logits` along it: every row's argmax is the answer's
    token at that position. The answer ends at its first stop token or at the token budget, so greedy decoding
    would stop there too."""
    return len(forced) == len(answer) and bool(np.array_equal(forced.argmax(axis=1), np.asarray(answer)))


def _cut_at_stop(ids: list[int], stops: set[int]) -> list[int]:
    for i, tok in enumerate(ids):
        if tok in stops:
            return ids[: i + 1]
    return ids


def _answer_rows(logits: np.ndarray, ids: Sequence[int], mask: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """The logit rows that predict the masked (assistant) tokens, as float64, and those tokens; logits[t] predicts
    ids[t + 1]."""
    keep = np.asarray(mask[1:], dtype=bool)
    return np.asarray(logits[:-1], dtype=np.float64)[keep], np.asarray(ids[1:])[keep]


def _nll(rows: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of `targets` under the logit `rows`, and how many there are."""
    if not len(rows):
        return 0.0, 0
    shifted = rows - rows.max(axis=1, keepdims=True)
    picked = shifted[np.arange(len(rows)), targets]
    log_z = np.log(np.exp(shifted, out=shifted).sum(axis=1))
    return float((log_z - picked).sum()), len(rows)


def _nll_from_logits(logits: np.ndarray, ids: Sequence[int], mask: Sequence[bool]) -> tuple[float, int]:
    """Summed negative log-likelihood of the masked tokens; logits[t] predicts ids[t + 1]."""
    return _nll(*_answer_rows(logits, ids, mask))


def _near_top_tokens(rows: np.ndarray, margin: float) -> list[np.ndarray]:
    """Per row, the token ids scored within `margin` logits of the row's top token. Kept instead of the rows
    themselves: a vocabulary-wide row per held-out token would not fit in memory."""
    return [np.flatnonzero(row >= row.max() - margin) for row in rows]


# ------------------------------------------------------------------------------------------------------ the two sides


@contextmanager
def _torch_threads(n: int):
    """torch's thread count is process-wide: set it for the verification and put it back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _GgufSide:
    """llama.cpp on the quantised file: greedy continuations and logits over given token ids.

    Opened by ``loop.core.gguf_model.open_llama`` (the app's loader) with ``logits_all=True``: every
    position's logits are scored here. ModelLoadError when the file cannot be loaded."""

    def __init__(self, gguf_path: Path, n_ctx: int, n_threads: int):
        self.llm = open_llama(gguf_path, n_ctx=n_ctx, n_threads=n_threads, logits_all=True, n_batch=min(512, n_ctx))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], copy=True)

    def greedy(self, ids: Sequence[int], n: int, stops: set[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(tok)
            if tok in stops:
                break
            self.llm.eval([tok])
        return out

    def chat_ids(self, segments: Sequence[Segment]) -> list[int]:
        """llama.cpp's token ids for a rendered chat, by the app's rule: markup with its special tokens, message
        text never parsed for them (``loop.core.chat_template``)."""
        return llama_segment_ids(self.llm, segments)

    def quantization(self) -> str | None:
        """The file's quantisation from its `general.file_type` metadata ("Q8_0", "f16", ...), None if unknown."""
        import llama_cpp

        try:
            ftype = int(self.llm.metadata.get("general.file_type", "")) & ~int(llama_cpp.LLAMA_FTYPE_GUESSED)
        except ValueError:
            return None
        names = {"LLAMA_FTYPE_ALL_F32": "f32", "LLAMA_FTYPE_MOSTLY_F16": "f16", "LLAMA_FTYPE_MOSTLY_BF16": "bf16"}
        for attr in dir(llama_cpp):
            if attr.startswith("LLAMA_FTYPE_") and getattr(llama_cpp, attr) == ftype and attr != "LLAMA_FTYPE_GUESSED":
                return names.get(attr, attr.removeprefix("LLAMA_FTYPE_MOSTLY_"))
        return None

    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close:
            close()
        self.llm = None


class _HfSide:
    """transformers on the merged weights, in float32: the reference both checks compare against."""

    def __init__(self, merged_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
        self.model.eval()
        # `generate` fills unset options from the checkpoint's generation config (a repetition penalty, say); the
        # probes' answers are plain argmax decoding, so none of those may apply.
        self.model.generation_config = GenerationConfig()
        # transformers 5.x renamed the KV-cache argument and output `past_key_values` -> `cache`; accept either.
        params = inspect.signature(self.model.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([list(ids)]))
        return out.logits[0].float().numpy()

    def greedy_batch(self, prompts: Sequence[Sequence[int]], n: int, stops: set[int]) -> list[list[int]]:
        """Greedy answers to `prompts`, `_PROBE_BATCH` at a time in left-padded `generate` calls. Each answer is what
        `greedy` writes (up to float rounding): at most `n` tokens, ending at the first stop token, which is kept."""
        from transformers import GenerationConfig

        torch = self.torch
        if n < 1:
            return [[] for _ in prompts]
        # A finished row is padded with a stop token, so cutting each row at its first stop drops the padding.
        pad = min(stops) if stops else 0
        settings = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, pad_token_id=pad,
                                    eos_token_id=sorted(stops) or None)
        answers: list[list[int]] = []
        for start in range(0, len(prompts), _PROBE_BATCH):
            rows = [list(p) for p in prompts[start: start + _PROBE_BATCH]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row):] = 1
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
            answers.extend(_cut_at_stop(row, stops) for row in out[:, width:].tolist())
        return answers

    def greedy(self, ids: Sequence[int], n: int, stops: set[int]) -> list[int]:
        """One prompt's greedy answer, one token per forward pass: the reference `greedy_batch` is measured
        against (tests/trainer/test_trainer_verify_speed.py, benchmarks/verify_speed.py)."""
        torch = self.torch
        out: list[int] = []
        with torch.inference_mode():
            step = self.model(torch.tensor([list(ids)]), use_cache=True)
            for _ in range(n):
                tok = int(step.logits[0, -1].argmax())
                out.append(tok)
                if tok in stops:
                    break
                cache = getattr(step, self.cache_name)
                step = self.model(torch.tensor([[tok]]), use_cache=True, **{self.cache_name: cache})
        return out


# ---------------------------------------------------------------------------------------------------------- loading


def _gguf_header_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"GGUF file {path} does not exist"
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        return f"{path.name} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')"
    return None


def _load_in_child(path: Path, timeout_s: float) -> str | None:
    """Load the file in a child process; None when it loads, else the reason (a native crash included)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "trainer.gguf_load_check", str(path)], capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"loading {path.name} in llama.cpp took longer than {timeout_s:.0f} s"
    if proc.returncode == 0 and "LOAD_OK" in proc.stdout:
        return None
    log = (proc.stderr + proc.stdout).splitlines()
    hints = [ln.strip() for ln in log if any(k in ln.lower() for k in ("error", "failed", "invalid", "exception"))
             and not ln.lstrip().startswith(("raise ", "File "))]  # llama.cpp's lines, not the traceback's
    detail = "; ".join(hints[-4:]) or (log[-1].strip() if log else "no output")
    how = f"crashed with signal {-proc.returncode}" if proc.returncode < 0 else f"exited {proc.returncode}"
    return f"llama.cpp could not load {path.name} (loader {how}): {detail}"


# ------------------------------------------------------------------------------------------------------ verification


def verify_gguf(
    gguf_path: Path,
    merged_dir: Path,
    probes: Sequence[str | dict] | None = None,
    eval_examples: Sequence[Any] | None = None,
    config: VerifyConfig | ExportConfig | None = None,
    quantization: str | None = None,
) -> VerificationResult:
    """Check the quantised `gguf_path` against the merged HF model in `merged_dir`; see the module docstring.

    probes: prompts (strings or {"prompt": ...} dicts); None = the fixed set in loop/core/probes.jsonl.
    eval_examples: held-out chat examples (see `example_messages`); empty = the loss check cannot run.
    quantization: the quantisation whose default thresholds apply (e.g. "Q8_0"); None = read from the file itself.
        Passing another name holds the file to that type's gate (a Q2_K file judged by Q8_0's bar, say).
    """
    started = time.monotonic()
    if isinstance(config, ExportConfig):
        config = config.verify
    config = config or VerifyConfig()
    result = VerificationResult(passed=False, reasons=[], load_ok=False, probe_tokens=config.probe_tokens,
                                tie_margin=config.tie_margin, quantization=quantization)
    gguf_path, merged_dir = Path(gguf_path), Path(merged_dir)

    def finish() -> VerificationResult:
        result.passed = not result.reasons
        result.duration_s = round(time.monotonic() - started, 2)
        return result

    problem = _gguf_header_problem(gguf_path)
    if problem is None and config.load_check_subprocess:
        problem = _load_in_child(gguf_path, config.load_check_timeout_s)
    if problem:
        result.load_error = problem
        result.reasons.append(problem)
        return finish()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    stops = stop_token_ids(tokenizer)
    probes = list(load_probes() if probes is None else probes)
    probe_inputs = [(probe_prompt_messages(p), prompt_ids(tokenizer, probe_prompt_messages(p))) for p in probes]
    examples = []
    for example in list(eval_examples or [])[: config.max_eval_examples]:
        try:
            tok = tokenize_example(tokenizer, example_messages(example), config.max_eval_tokens, answers="all")
        except ValueError:
            continue  # an example without an assistant turn has nothing to score
        examples.append((tok.input_ids, tok.completion_mask))
    longest = max([len(ids) for _, ids in probe_inputs] + [len(ids) for ids, _ in examples] + [1])
    n_ctx = int(math.ceil((longest + config.probe_tokens + 8) / 256.0) * 256)

    try:
        gguf = _GgufSide(gguf_path, n_ctx, config.resolved_threads())
    except ModelLoadError as exc:  # the message names the file and llama.cpp's reason
        result.load_error = str(exc)
        result.reasons.append(result.load_error)
        return finish()
    result.load_ok = True
    quantization = quantization or gguf.quantization() or "Q8_0"
    min_agreement, max_loss = config.thresholds(quantization)
    result.quantization, result.min_agreement, result.max_loss_rel_delta = quantization, min_agreement, max_loss

    from tqdm.auto import tqdm

    try:
        # The merged model answers first: its greedy answers are the path both models are teacher-forced along.
        with _torch_threads(config.resolved_threads()):
            hf = _HfSide(merged_dir)
            hf_probe_ids = hf.greedy_batch([ids for _, ids in probe_inputs], config.probe_tokens, stops)
            hf_forced = [_forced_logits(hf, ids, ans) for (_, ids), ans in zip(probe_inputs, hf_probe_ids)]
            hf_nll, hf_near_top = [], []
            for ids, mask in tqdm(examples, desc="held-out loss (merged model)", leave=False):
                rows, targets = _answer_rows(hf.logits(ids), ids, mask)
                hf_nll.append(_nll(rows, targets))
                hf_near_top.append(_near_top_tokens(rows, config.tie_margin))
        del hf
        gc.collect()

        gguf_forced = [_forced_logits(gguf, ids, ans) for (_, ids), ans in zip(probe_inputs, hf_probe_ids)]
        # Where llama.cpp's forced argmax follows the merged answer, that answer is its free-running one (up to rounding).
        gguf_probe_ids = [list(ans) if _follows(forced, ans) else None
                          for ans, forced in zip(hf_probe_ids, gguf_forced)]
        differing = [i for i, g_ids in enumerate(gguf_probe_ids) if g_ids is None]
        for i in tqdm(differing, desc="probes (gguf)", leave=False):
            gguf_probe_ids[i] = gguf.greedy(probe_inputs[i][1], config.probe_tokens, stops)
        token_matches = [gguf.chat_ids(hf_chat_segments(tokenizer, msgs, True)) == ids for msgs, ids in probe_inputs]
        gguf_nll, gguf_top = [], []
        for ids, mask in tqdm(examples, desc="held-out loss (gguf)", leave=False):
            rows, targets = _answer_rows(gguf.logits(ids), ids, mask)
            gguf_nll.append(_nll(rows, targets))
            gguf_top.append(rows.argmax(axis=1))
        template = gguf.chat_template()
    finally:
        gguf.close()
        gc.collect()
    hf_template = getattr(tokenizer, "chat_template", None)
    result.chat_template_match = bool(template) and template == hf_template

    # Probe agreement: tie-tolerant along the merged model's answer (gated), exact free-running (reported).
    tolerant, exact, same_top, positions = [], [], 0, 0
    for (msgs, _), h_ids, g_ids, h_log, g_log in zip(probe_inputs, hf_probe_ids, gguf_probe_ids, hf_forced,
                                                     gguf_forced):
        h_ids, g_ids = _cut_at_stop(h_ids, stops), _cut_at_stop(g_ids, stops)
        g_top = g_log.argmax(axis=1)
        gaps = h_log.max(axis=1) - h_log[np.arange(len(g_top)), g_top]
        worst = float(gaps.max()) if len(gaps) else 0.0
        same_top += int((g_top == h_log.argmax(axis=1)).sum())
        positions += len(g_top)
        tolerant.append(worst <= config.tie_margin)
        exact.append(g_ids == h_ids)
        result.probe_details.append({
            "prompt": msgs[-1]["content"], "agree": tolerant[-1], "exact": exact[-1], "max_gap": round(worst, 4),
            "hf_text": tokenizer.decode(h_ids), "gguf_text": tokenizer.decode(g_ids),
            "hf_ids": h_ids, "gguf_ids": g_ids,
        })
    if probe_inputs:
        result.agreement = round(sum(tolerant) / len(tolerant), 4)
        result.exact_agreement = round(sum(exact) / len(exact), 4)
        result.token_agreement = round(same_top / max(positions, 1), 4)
        result.tokenizer_agreement = round(sum(token_matches) / len(token_matches), 4)
        if result.agreement < min_agreement:
            result.reasons.append(
                f"probe agreement {result.agreement:.0%} is below {min_agreement:.0%}: along the merged model's "
                f"greedy answers, the GGUF's top token stays the same or within {config.tie_margin:g} logits of it "
                f"for the first {config.probe_tokens} tokens on only {sum(tolerant)} of {len(tolerant)} probes"
            )
        if config.require_tokenizer_match and result.tokenizer_agreement < 1.0:
            bad = sum(1 for m in token_matches if not m)
            result.reasons.append(f"llama.cpp tokenises {bad} of {len(token_matches)} probe prompts differently "
                                  "from the merged model's tokenizer (the app would serve other inputs)")
    else:
        result.reasons.append("no probes given: probe agreement could not be measured")

    # Held-out loss: token-weighted mean cross-entropy over the assistant tokens, from each side's own logits.
    n_tokens = sum(n for _, n in hf_nll)
    if n_tokens:
        result.n_eval_examples = len(examples)
        result.n_eval_tokens = n_tokens
        result.hf_eval_loss = round(sum(s for s, _ in hf_nll) / n_tokens, 6)
        result.gguf_eval_loss = round(sum(s for s, _ in gguf_nll) / n_tokens, 6)
        result.loss_abs_delta = round(result.gguf_eval_loss - result.hf_eval_loss, 6)
        result.loss_delta = round(abs(result.loss_abs_delta) / max(result.hf_eval_loss, 1e-9), 6)
        same = sum(int(top in near) for tops, nears in zip(gguf_top, hf_near_top) for top, near in zip(tops, nears))
        result.eval_agreement = round(same / n_tokens, 4)
        result.min_eval_agreement = config.min_eval_agreement
        gap = abs(result.loss_abs_delta)
        within_bounds = result.loss_delta <= max_loss or gap <= config.max_loss_abs_delta
        agreeing = result.eval_agreement >= config.min_eval_agreement and gap <= config.max_agreeing_loss_abs_delta
        if not (within_bounds or agreeing):
            result.reasons.append(
                f"held-out loss from llama.cpp's logits ({result.gguf_eval_loss:.4f}) differs from the merged "
                f"model's ({result.hf_eval_loss:.4f}) by {result.loss_delta:.2%} (relative {result.loss_delta:.4g}), "
                f"above the tolerance of {max_loss:.4g}, and by {gap:.4f} nats/token, above the absolute floor of "
                f"{config.max_loss_abs_delta:g}; along the held-out answers llama.cpp picks the merged model's token "
                f"(within {config.tie_margin:g} logits) at {result.eval_agreement:.1%} of {n_tokens} positions "
                + (f"(the bar is {config.min_eval_agreement:.0%})" if result.eval_agreement < config.min_eval_agreement
                   else f"but the gap is beyond the {config.max_agreeing_loss_abs_delta:g} that agreement can clear")
            )
    elif config.require_loss_check:
        result.reasons.append("no held-out example with an assistant turn: the loss check could not run")
    return finish()
