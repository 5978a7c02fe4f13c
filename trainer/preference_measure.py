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

import json
import math
from pathlib import Path

from trainer.config import TrainConfig
from trainer.data import tokenize_examples
from trainer.evaluate import answer_mask, load_for_eval, masked_nll, pad_id
from trainer.preference_data import LABEL_VALUES, PreferenceData
from trainer.run_report import ADAPTER_DIR, write_metrics


def answer_logprobs(model, tokenizer, prompts_answers: list[tuple[list[dict], str]], max_length: int,
                    batch_size: int = 4, disable_adapter: bool = False) -> list[float]:
    """Mean per-token log-probability of each answer (end-of-turn included) given its prompt, one value per
    pair in order; nan where no answer token is left within ``max_length``."""
    examples = [{"messages": list(p) + [{"role": "assistant", "content": a}]} for p, a in prompts_answers]
    rows = [tokenize_examples(tokenizer, [e], max_length).rows for e in examples]
    kept = [r[0] for r in rows if r]
    scored = iter(masked_nll(model, [r["input_ids"] for r in kept], [answer_mask(r) for r in kept],
                             pad_id(tokenizer), batch_size, disable_adapter))
    out = []
    for r in rows:
        nll, n = next(scored) if r else (math.nan, 0)
        out.append(-nll / n if n else math.nan)
    return out


def preference_measures(model, tokenizer, data: PreferenceData, config: TrainConfig) -> dict:
    """The preference measure of a PEFT model and of its starting weights (module docstring).

    Every distinct (prompt, answer) is scored once per set of weights: a thumbs-down answer is usually both a
    pair's rejected answer and an undesirable label, and it is the longest text here."""
    out: dict = {}
    pairs, pairs_split = (data.eval_pairs, "eval") if data.eval_pairs else (data.pairs, "train")
    labels, labels_split = (data.eval_labels, "eval") if data.eval_labels else (data.labels, "train")
    if pairs:
        out.update(pairs_split=pairs_split, pairs=len(pairs))
    if labels:
        out.update(labels_split=labels_split, labels=len(labels))
    texts = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs] \
        + [(r["prompt"], r["answer"]) for r in labels]
    keys = [json.dumps(t, sort_keys=True) for t in texts]
    unique = list(dict.fromkeys(keys))
    first = {k: texts[keys.index(k)] for k in unique}
    for suffix, off in (("", False), ("_start", True)):
        scored = dict(zip(unique, answer_logprobs(model, tokenizer, [first[k] for k in unique], config.max_length,
                                                  config.batch_size, disable_adapter=off))) if unique else {}
        values = [scored[k] for k in keys]
        chosen, rejected = values[:len(pairs)], values[len(pairs):2 * len(pairs)]
        both = [(c, r) for c, r in zip(chosen, rejected) if math.isfinite(c) and math.isfinite(r)]
        if both:
            out[f"chosen_logprob{suffix}"] = _mean(chosen)
            out[f"rejected_logprob{suffix}"] = _mean(rejected)
            out[f"margin{suffix}"] = _mean([c - r for c, r in both])
            out[f"win_rate{suffix}"] = sum(c > r for c, r in both) / len(both)
        for kind in LABEL_VALUES:
            rows = [v for r, v in zip(labels, values[2 * len(pairs):]) if r["label"] == kind]
            if rows:
                out[f"{kind}_logprob{suffix}"] = _mean(rows)
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
