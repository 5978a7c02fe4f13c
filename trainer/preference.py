"""Preference objectives on the same LoRA machinery: DPO on correction pairs, KTO on thumbs/quality labels.

A run's ``TrainConfig.objective`` says what it optimises (trainer.config.OBJECTIVES):

- ``sft``: ``trainer.train.train`` as it is;
- ``dpo`` / ``kto``: TRL's ``DPOTrainer`` on the snapshot's pairs / ``KTOTrainer`` on its labels, a fresh
  LoRA adapter on the starting weights, which are also the reference model;
- ``sft+dpo`` / ``sft+kto``: an ordinary SFT run in ``DIR/sft/`` first, then the preference objective
  continues *that* adapter, with the SFT weights as the reference (TRL copies the loaded adapter into a
  frozen "ref" adapter). Sequential rather than one combined loss, because the SFT stage is then exactly
  the SFT variant (replay, general replay and best-epoch selection included) and the preference stage is
  measured against it; a combined DPO+NLL loss would train SFT only on the pairs' chosen answers.

Contract, the same for every objective: the run directory holds ``training_progress.json`` (the resume
contract, with the objective and beta in it for preference runs, the pairs'/labels' hash as the data hash
and the SFT adapter's fingerprint beside the base), ``checkpoint-<step>/``, ``adapter/`` and
``metrics.json`` with ``eval_loss``/``regression_loss`` (+ ``_start``) on the SFT held-out and regression
sets, so the gate judges every objective on the same numbers. The NaN/explosion guard and the best-epoch
judge are the SFT run's own callbacks. ``metrics["preference"]`` adds the preference measure (held-out
pairs when there are any, else the training ones): the mean per-token log-probability of the chosen and
of the rejected answers, their margin and the share of pairs the chosen answer wins, for the trained
adapter and for the starting weights (``_start``); and the same for desirable/undesirable labels.

Prompts and answers are tokenised by the project's chat-template rule (trainer.data: message text is
never parsed for special tokens), then handed to TRL already tokenised.

Bad input: an objective whose data is missing (no pairs for DPO; no labels, or labels of one class only,
for KTO) is a ``PreferenceSkipped`` error carrying the stated reason; ``trainer.variants`` records such a
variant as ``skipped`` and never chooses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trainer.config import TrainConfig
from trainer.data import DataError, TokenizedSet, data_hash, load_examples, split_eval, tokenize_example

log = logging.getLogger(__name__)

PAIRS, LABELS, EVAL_PAIRS, EVAL_LABELS = "pairs.jsonl", "labels.jsonl", "eval_pairs.jsonl", "eval_labels.jsonl"
SFT_STAGE_DIR = "sft"
LABEL_VALUES = ("desirable", "undesirable")


class PreferenceSkipped(DataError):
    """The objective has nothing to learn from in this data; the message is the stated reason."""


@dataclass
class PreferenceData:
    """Pairs and labels of one snapshot, split like its examples (annotation/snapshot.py)."""

    pairs: list[dict] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)
    eval_pairs: list[dict] = field(default_factory=list)
    eval_labels: list[dict] = field(default_factory=list)

    @classmethod
    def from_dir(cls, directory: str | Path | None) -> PreferenceData:
        """The four files of a snapshot directory; a missing file is empty, a malformed one a DataError."""
        if directory is None:
            return cls()
        directory = Path(directory)
        if not directory.is_dir():
            raise DataError(f"preference data directory not found: {directory}")
        return cls(*(load_rows(directory / name, "pair" if "pairs" in name else "label")
                     for name in (PAIRS, LABELS, EVAL_PAIRS, EVAL_LABELS)))


def load_rows(path: Path, kind: str) -> list[dict]:
    """Rows of a pairs or labels file ([] when absent); DataError naming every bad line."""
    path = Path(path)
    if not path.is_file():
        return []
    rows, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not JSON ({exc.msg})")
            continue
        problem = _row_problem(row, kind)
        if problem:
            problems.append(f"{path}:{number}: {problem}")
        else:
            rows.append(row)
    if problems:
        raise DataError(f"{len(problems)} bad {kind} row(s) in {path}:\n  " + "\n  ".join(problems[:20]))
    return rows


def _row_problem(row: object, kind: str) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                          "assistant")
            for m in prompt):
        return "'prompt' must be a non-empty list of {role, content} messages"
    texts = ("chosen", "rejected") if kind == "pair" else ("answer",)
    for name in texts:
        if not isinstance(row.get(name), str) or not row[name].strip():
            return f"{name!r} must be a non-empty string"
    if kind == "label" and row.get("label") not in LABEL_VALUES:
        return f"'label' must be one of {LABEL_VALUES}, got {row.get('label')!r}"
    return None


def stage_of(objective: str) -> str | None:
    """The preference trainer an objective uses ("dpo", "kto"), or None for plain SFT."""
    return None if objective == "sft" else objective.split("+")[-1]


def skip_reason(objective: str, data: PreferenceData) -> str | None:
    """Why `objective` cannot train on `data` (None when it can)."""
    stage = stage_of(objective)
    if stage == "dpo" and not data.pairs:
        return ("no preference pairs to train DPO on: no reviewer correction differs from the model's logged "
                "answer outside the held-out set")
    if stage == "kto":
        if not data.labels:
            return "no labelled answers to train KTO on (no thumbs and no quality >= 4 or <= 2 outside the held-out set)"
        kinds = {row["label"] for row in data.labels}
        if len(kinds) < 2:
            (only,) = kinds
            return (f"only {only} labels ({len(data.labels)}): KTO needs desirable and undesirable answers to "
                    "tell apart")
    return None


# ---------------------------------------------------------------- running an objective

def train_objective(data, output_dir: str | Path, *, base: str | Path | None = None, eval_data=None, replay=None,
                    preference: PreferenceData | str | Path | None = None, config: TrainConfig | None = None,
                    force: bool = False) -> dict:
    """Train `config.objective` into output_dir; return its metrics (also DIR/metrics.json).

    `data`, `eval_data`, `replay`, `base`, `force`: as trainer.train.train. `preference`: a PreferenceData or
    the snapshot directory holding its files. Raises PreferenceSkipped when the objective has no data.
    """
    from loop.core.errors import ConfigError
    from trainer.train import train

    config = config or TrainConfig()
    problems = config.validate()
    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))
    if not isinstance(preference, PreferenceData):
        preference = PreferenceData.from_dir(preference)
    reason = skip_reason(config.objective, preference)
    if reason:
        raise PreferenceSkipped(reason)
    stage = stage_of(config.objective)
    output_dir = Path(output_dir)
    if stage is None:
        metrics = train(data, output_dir, base=base, eval_data=eval_data, replay=replay, config=config, force=force)
        return _add_measures(output_dir, metrics, preference, config)
    if stage == "kto" and config.batch_size < 2:
        raise ConfigError("KTO estimates its KL term from the other answers of a batch: trainer.batch_size must "
                          f"be >= 2, got {config.batch_size}")

    started = time.time()
    examples = load_examples(data) if isinstance(data, (str, Path)) else list(data)
    if eval_data is None:
        held_out = split_eval(examples, config.eval_fraction, config.seed)[1]
    else:
        held_out = load_examples(eval_data) if isinstance(eval_data, (str, Path)) else list(eval_data)
    start_adapter = None
    if config.objective.startswith("sft+"):
        sft = train(data, output_dir / SFT_STAGE_DIR, base=base, eval_data=eval_data, replay=replay,
                    config=replace(config, objective="sft"), force=force)
        if sft.get("status") != "ok":
            from trainer.train import _write_metrics

            metrics = {"status": "failed", "reason": f"SFT stage failed: {sft.get('reason')}",
                       "failure": sft.get("failure"), "objective": config.objective, "config": asdict(config),
                       "stages": {"sft": _stage_summary(sft)}, "wall_time_s": time.time() - started}
            _write_metrics(output_dir, metrics)
            return metrics
        start_adapter = output_dir / SFT_STAGE_DIR / "adapter"
    metrics = _train_preference(stage, preference, output_dir, base, start_adapter, held_out, config, force,
                                started)
    if start_adapter is not None:
        metrics["stages"] = {"sft": _stage_summary(sft)}
        from trainer.train import _write_metrics

        _write_metrics(output_dir, metrics)
    return metrics


def _stage_summary(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in ("status", "reason", "steps", "eval_loss", "regression_loss",
                                        "train_loss_final", "best_epoch", "tokens_per_s", "wall_time_s")}


def _train_preference(stage: str, preference: PreferenceData, output_dir: Path, base, start_adapter: Path | None,
                      held_out: list, config: TrainConfig, force: bool, started: float) -> dict:
    import torch
    from accelerate import PartialState

    from trainer.base_model import base_identity, resolve_base
    from trainer.evaluate import regression_examples
    from trainer.resume import TrainingProgress, check_or_start, newest_complete_checkpoint
    from trainer.train import TrainingError, _finished_metrics, _is_oom, _oom_advice, _report, _write_metrics

    state = PartialState(cpu=not torch.cuda.is_available())
    rows = preference.pairs if stage == "dpo" else preference.labels
    with state.main_process_first():
        base_path = resolve_base(base)
    identity = dict(base_identity(base_path), start_adapter=_fingerprint(start_adapter))
    progress = TrainingProgress(config=config.resume_fields(), data_hash=_rows_hash(rows),
                                eval_hash=data_hash(held_out), base=identity, world_size=state.num_processes)
    may_resume = check_or_start(output_dir, progress, force, write=state.is_main_process)
    state.wait_for_everyone()
    finished = _finished_metrics(output_dir) if may_resume else None
    if finished is not None:
        log.info("%s already finished (status %s); not training again", output_dir, finished["status"])
        return finished

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset_rows, tokenized = tokenize_preference(tokenizer, rows, stage, config.max_length)
    if not dataset_rows:
        raise PreferenceSkipped(f"no {stage.upper()} row has a prompt shorter than max_length={config.max_length}")
    with state.main_process_first():
        checkpoint = newest_complete_checkpoint(output_dir) if may_resume else None
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    try:
        trainer, guard = build_preference_trainer(stage, base_path, start_adapter, tokenizer, dataset_rows,
                                                  output_dir, config)
        if config.select_best_epoch and held_out:
            from trainer.best_epoch import make_callback

            trainer.add_callback(make_callback(output_dir, tokenizer, held_out,
                                               regression_examples(config.regression_set or None), config))
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as exc:  # noqa: BLE001 - OOM re-raised with advice, anything else recorded then re-raised
        reason = _oom_advice(exc, config) if _is_oom(exc) else f"{type(exc).__name__}: {exc}"
        if state.is_main_process:
            _write_metrics(output_dir, {"status": "failed", "reason": reason, "failure": "error",
                                        "objective": config.objective, "config": asdict(config),
                                        "wall_time_s": time.time() - started})
        if _is_oom(exc):
            raise TrainingError(reason) from exc
        raise
    model = trainer.model
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # the frozen reference is not part of the result
    metrics = {}
    if state.is_main_process:
        metrics = _report(trainer, guard, tokenizer, result, config, output_dir, base_path, started, rows,
                          held_out, tokenized, TokenizedSet([], 0, 0, 0), checkpoint, len(rows))
        metrics["objective"] = config.objective
        if metrics["status"] == "ok":
            metrics["preference"] = preference_measures(model, tokenizer, preference, config)
        _write_metrics(output_dir, metrics)
    state.wait_for_everyone()
    del trainer
    if not state.is_main_process:
        metrics = _finished_metrics(output_dir) or {}
    return metrics


def _rows_hash(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def _fingerprint(adapter: Path | None) -> str | None:
    if adapter is None:
        return None
    weights = Path(adapter) / "adapter_model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None


def _split_ids(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids up to the assistant header, answer ids with the end-of-turn) by the project's rule."""
    tok = tokenize_example(tokenizer, list(prompt) + [{"role": "assistant", "content": answer}], 10**9)
    cut = tok.completion_mask.index(1) if 1 in tok.completion_mask else len(tok.input_ids)
    return tok.input_ids[:cut], tok.input_ids[cut:]


def tokenize_preference(tokenizer, rows: list[dict], stage: str, max_length: int) -> tuple[list[dict], TokenizedSet]:
    """TRL's tokenised columns for DPO (prompt/chosen/rejected ids) or KTO (prompt/completion ids + label).

    A row whose prompt alone fills max_length is dropped (nothing of its answers would remain); the
    collator cuts the rest at max_length. The TokenizedSet counts what metrics.json reports.
    """
    out, truncated, dropped, tokens = [], 0, 0, 0
    for row in rows:
        if stage == "dpo":
            prompt_ids, chosen = _split_ids(tokenizer, row["prompt"], row["chosen"])
            _, rejected = _split_ids(tokenizer, row["prompt"], row["rejected"])
            entry = {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected}
            longest = len(prompt_ids) + max(len(chosen), len(rejected))
        else:
            prompt_ids, completion = _split_ids(tokenizer, row["prompt"], row["answer"])
            entry = {"prompt_ids": prompt_ids, "completion_ids": completion, "label": row["label"] == "desirable"}
            longest = len(prompt_ids) + len(completion)
        if len(prompt_ids) >= max_length:
            dropped += 1
            continue
        truncated += longest > max_length
        tokens += min(longest, max_length)
        out.append(entry)
    return out, TokenizedSet([], truncated, dropped, tokens)


def build_preference_trainer(stage: str, base_path: str, start_adapter: Path | None, tokenizer, rows: list[dict],
                             output_dir: Path, config: TrainConfig):
    """(DPOTrainer or KTOTrainer, divergence guard) on tokenised rows, with the SFT run's LoRA and callbacks."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from trainer.train import _callbacks, _load_model

    cuda = torch.cuda.is_available()
    model = _load_model(base_path, config, cuda)
    peft_config = None
    if start_adapter is not None:
        model = PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True)
    else:
        peft_config = LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
                                 target_modules=config.target_modules_value(), bias="none", task_type="CAUSAL_LM")
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="no",  # the best-epoch judge scores the SFT held-out and regression sets instead
        report_to="none",
        max_length=config.max_length,
        beta=config.preference_beta,
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=cuda,
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )
    trainer_class, config_class = (_PretokenizedDPO(DPOTrainer), DPOConfig) if stage == "dpo" else \
        (_PretokenizedKTO(KTOTrainer), KTOConfig)
    guard_class, injector_class = _callbacks()
    callbacks = [guard_class(config.loss_explode_factor, getattr(model.config, "vocab_size", None))]
    if config.inject_nan_at_step:
        callbacks.append(injector_class(model, config.inject_nan_at_step))
    trainer = trainer_class(model=model, args=config_class(**args), train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    return trainer, callbacks[0]


def _PretokenizedDPO(base):  # noqa: N802 - a class factory: TRL is imported only when training
    class PretokenizedDPOTrainer(base):
        """DPOTrainer fed rows tokenised by the project's chat-template rule (no re-tokenising)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            return dataset

    return PretokenizedDPOTrainer


def _PretokenizedKTO(base):  # noqa: N802
    class PretokenizedKTOTrainer(base):
        """KTOTrainer fed rows tokenised by the project's rule; the KL completions are added as TRL does."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if not self.calculate_KL:
                return dataset

            # KL estimate from mismatched (prompt, answer) pairs: answers rotated by one within each batch.
            def add_kl(batch):
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            return dataset.map(add_kl, batched=True, batch_size=args.per_device_train_batch_size)

    return PretokenizedKTOTrainer


# ---------------------------------------------------------------- the preference measure

def answer_logprobs(model, tokenizer, prompts_answers: list[tuple[list[dict], str]], max_length: int,
                    batch_size: int = 4, disable_adapter: bool = False) -> list[float]:
    """Mean per-token log-probability of each answer (end-of-turn included) given its prompt."""
    from contextlib import nullcontext

    import torch

    from trainer.data import IGNORE_INDEX, tokenize_examples

    examples = [{"messages": list(p) + [{"role": "assistant", "content": a}]} for p, a in prompts_answers]
    rows = tokenize_examples(tokenizer, examples, max_length).rows
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (model.disable_adapter() if disable_adapter else nullcontext()):
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                width = max(len(r["input_ids"]) for r in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
                for i, r in enumerate(batch):
                    n = len(r["input_ids"])
                    ids[i, :n], attention[i, :n] = torch.tensor(r["input_ids"]), 1
                    labels[i, :n] = torch.tensor(r["labels"])
                logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
                targets = labels[:, 1:].to(device)
                logp = torch.log_softmax(logits[:, :-1, :], dim=-1)
                mask = targets != IGNORE_INDEX
                picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
                out.extend((picked.sum(-1) / mask.sum(-1).clamp(min=1)).tolist())
    finally:
        if was_training:
            model.train()
    return out


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


def _add_measures(output_dir: Path, metrics: dict, data: PreferenceData, config: TrainConfig) -> dict:
    """An SFT run measured on the same preference measure, so the gate can set it beside DPO/KTO."""
    metrics.setdefault("objective", "sft")
    if metrics.get("status") != "ok" or "preference" in metrics or not (
            data.pairs or data.labels or data.eval_pairs or data.eval_labels):
        return metrics
    import torch

    from trainer.evaluate import load_for_eval
    from trainer.train import ADAPTER_DIR, _write_metrics

    model, tokenizer = load_for_eval(output_dir / ADAPTER_DIR)
    if torch.cuda.is_available():
        model.to("cuda")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    metrics["preference"] = preference_measures(model, tokenizer, data, config)
    _write_metrics(output_dir, metrics)
    return metrics
