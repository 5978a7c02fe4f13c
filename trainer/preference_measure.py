"""The preference measure: how much more likely a model finds the chosen answers than the rejected ones.

Contract: ``preference_measures(model, tokenizer, data, config)`` -> a dict for ``metrics["preference"]``: on
the held-out pairs when there are any, else the training ones (``pairs_split``), the mean per-token
log-probability of the chosen and of the rejected answers, their margin and the share of pairs the chosen
answer wins; the same keys with ``_start`` for the starting weights (the PEFT adapter switched off); and
``desirable_logprob``/``undesirable_logprob`` (+ ``_start``) on the labels. ``answer_logprobs`` is the
per-answer number, read from trainer/evaluate.py's one masked cross-entropy. ``add_measures`` puts the same
measure in an SFT run's metrics.json, so the gate can set SFT beside DPO/KTO.
"""

from __future__ import annotations

import math
from pathlib import Path

from trainer.config import TrainConfig
from trainer.data import tokenize_examples
from trainer.evaluate import answer_mask, load_for_eval, masked_nll, pad_id
from trainer.preference_data import LABEL_VALUES, PreferenceData
from trainer.run_report import ADAPTER_DIR, write_metrics


def answer_logprobs(model, tokenizer, prompts_answers: list[tuple[list[dict], str]], max_length: int,
                    batch_size: int = 4, disable_adapter: bool = False) -> list[float]:
    """Mean per-token log-probability of each answer (end-of-turn included) given its prompt."""
    examples = [{"messages": list(p) + [{"role": "assistant", "content": a}]} for p, a in prompts_answers]
    rows = tokenize_examples(tokenizer, examples, max_length).rows
    scored = masked_nll(model, [r["input_ids"] for r in rows], [answer_mask(r) for r in rows], pad_id(tokenizer),
                        batch_size, disable_adapter)
    return [-nll / max(n, 1) for nll, n in scored]


def preference_measures(model, tokenizer, data: PreferenceData, config: TrainConfig) -> dict:
    """The preference measure of a PEFT model and of its starting weights (module docstring)."""
    out: dict = {}
    pairs, split = (data.eval_pairs, "eval") if data.eval_pairs else (data.pairs, "train")
    if pairs:
        out.update(pairs_split=split, pairs=len(pairs))
        for suffix, off in (("", False), ("_start", True)):
            chosen = answer_logprobs(model, tokenizer, [(p["prompt"], p["chosen"]) for p in pairs],
                                     config.max_length, config.batch_size, disable_adapter=off)
            rejected = answer_logprobs(model, tokenizer, [(p["prompt"], p["rejected"]) for p in pairs],
                                       config.max_length, config.batch_size, disable_adapter=off)
            n = min(len(chosen), len(rejected))
            if n:
                out[f"chosen_logprob{suffix}"] = _mean(chosen)
                out[f"rejected_logprob{suffix}"] = _mean(rejected)
                out[f"margin{suffix}"] = _mean([c - r for c, r in zip(chosen, rejected)])
                out[f"win_rate{suffix}"] = sum(c > r for c, r in zip(chosen, rejected)) / n
    labels, split = (data.eval_labels, "eval") if data.eval_labels else (data.labels, "train")
    if labels:
        out.update(labels_split=split, labels=len(labels))
        for suffix, off in (("", False), ("_start", True)):
            for kind in LABEL_VALUES:
                rows = [(r["prompt"], r["answer"]) for r in labels if r["label"] == kind]
                if rows:
                    values = answer_logprobs(model, tokenizer, rows, config.max_length, config.batch_size,
                                             disable_adapter=off)
                    out[f"{kind}_logprob{suffix}"] = _mean(values)
    return out


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def add_measures(output_dir: Path, metrics: dict, data: PreferenceData, config: TrainConfig) -> dict:
    """An SFT run measured on the same preference measure, so the gate can set it beside DPO/KTO."""
    metrics.setdefault("objective", "sft")
    if metrics.get("status") != "ok" or "preference" in metrics or not (
            data.pairs or data.labels or data.eval_pairs or data.eval_labels):
        return metrics
    import torch

    model, tokenizer = load_for_eval(output_dir / ADAPTER_DIR)
    if torch.cuda.is_available():
        model.to("cuda")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    metrics["preference"] = preference_measures(model, tokenizer, data, config)
    write_metrics(output_dir, metrics)
    return metrics
