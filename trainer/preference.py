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
  Being that run, it is not trained twice: ``sft_run``, a finished SFT run (the grid's ``sft`` variant at
  the same learning rate and rank, trainer.variants), is linked into ``DIR/sft/`` and taken as the stage
  when its resume contract is the stage's own (config, data, held-out set, base); any other run there is
  removed and the stage trains. ``stages["sft"]["reused"]`` names the run taken.

Contract, the same for every objective: the run directory holds ``training_progress.json`` (the resume
contract, with the objective and beta in it for preference runs, the pairs'/labels' hash as the data hash
and the SFT adapter's fingerprint beside the base), ``checkpoint-<step>/``, ``adapter/`` and
``metrics.json`` with ``eval_loss``/``regression_loss`` (+ ``_start``) on the SFT held-out and regression
sets, so the gate judges every objective on the same numbers. The NaN/explosion guard and the best-epoch
judge are the SFT run's own callbacks. ``metrics["preference"]`` adds the preference measure (held-out
pairs when there are any, else the training ones): the mean per-token log-probability of the chosen and
of the rejected answers, their margin and the share of pairs the chosen answer wins, for the trained
adapter and for the starting weights (``_start``); and the same for desirable/undesirable labels.

An ``sft+X`` run whose preference stage the gate's rules would refuse (failed, diverged, no finite held-out
loss, regression beyond ``regression_tolerance`` or general answers kept below ``min_general_kept``) while
its SFT stage passes them *is* its SFT stage: metrics.json holds the SFT stage's numbers, ``fallback`` and
``adapter_dir = "sft/adapter"`` (trainer.run_report.adapter_subdir; what export merges), and the refused
stage under ``stages``.

Prompts and answers are tokenised by the project's chat-template rule (trainer.data: message text is
never parsed for special tokens), then handed to TRL already tokenised.

Modules: trainer/preference_data.py (the pairs and labels, ``skip_reason``), trainer/preference_trainer.py
(tokenising, the DPO/KTO trainers), trainer/preference_measure.py (the measure); this module runs an objective
through the run preamble and fit it shares with SFT (trainer/run_setup.py). Their public names are importable
from here.

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
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from loop.core.errors import ConfigError
from trainer.anchor import is_anchor
from trainer.best_epoch import forgetting
from trainer.config import TrainConfig
from trainer.data import TokenizedSet, data_hash, split_eval, tokenize_examples
from trainer.preference_data import (
    EVAL_LABELS,
    EVAL_PAIRS,
    LABEL_VALUES,
    LABELS,
    PAIRS,
    PreferenceData,
    PreferenceSkipped,
    load_rows,
    skip_reason,
    stage_of,
)
from trainer.preference_measure import add_measures, answer_logprobs, preference_measures
from trainer.preference_trainer import build_preference_trainer, tokenize_preference
from trainer.resume import ResumeMismatchError
from trainer.run_report import ADAPTER_DIR, finished_metrics, report, write_metrics
from trainer.run_setup import check_config, load_tokenizer, open_run

__all__ = ["EVAL_LABELS", "EVAL_PAIRS", "LABELS", "LABEL_VALUES", "PAIRS", "SFT_STAGE_DIR", "PreferenceData",
           "PreferenceSkipped", "answer_logprobs", "build_preference_trainer", "load_rows", "preference_measures",
           "skip_reason", "stage_of", "tokenize_preference", "train_objective"]

log = logging.getLogger(__name__)

SFT_STAGE_DIR = "sft"


def train_objective(data, output_dir: str | Path, *, base: str | Path | None = None, eval_data=None, replay=None,
                    preference: PreferenceData | str | Path | None = None, config: TrainConfig | None = None,
                    force: bool = False, sft_run: str | Path | None = None) -> dict:
    """Train `config.objective` into output_dir; return its metrics (also DIR/metrics.json).

    `data`, `eval_data`, `replay`, `base`, `force`: as trainer.train.train. `preference`: a PreferenceData or
    the snapshot directory holding its files. `sft_run`: a finished SFT run an ``sft+X`` objective may take as
    its SFT stage (module docstring). Raises PreferenceSkipped when the objective has no data.
    """
    from trainer.train import examples_of, train

    config = check_config(config)
    if not isinstance(preference, PreferenceData):
        preference = PreferenceData.from_dir(preference)
    reason = skip_reason(config.objective, preference)
    if reason:
        raise PreferenceSkipped(reason)
    stage = stage_of(config.objective)
    output_dir = Path(output_dir)
    if stage is None:
        metrics = train(data, output_dir, base=base, eval_data=eval_data, replay=replay, config=config, force=force)
        return add_measures(output_dir, metrics, preference, config)
    if stage == "kto" and config.batch_size < 2:
        raise ConfigError("KTO estimates its KL term from the other answers of a batch: trainer.batch_size must "
                          f"be >= 2, got {config.batch_size}")

    started = time.time()
    examples = examples_of(data)
    if eval_data is None:
        held_out = split_eval(examples, config.eval_fraction, config.seed)[1]
    else:
        held_out = examples_of(eval_data)
    start_adapter = None
    if config.objective.startswith("sft+"):
        sft = _sft_stage(train, data, output_dir / SFT_STAGE_DIR, base, eval_data, replay, config, force, sft_run)
        if sft.get("status") != "ok":
            metrics = {"status": "failed", "reason": f"SFT stage failed: {sft.get('reason')}",
                       "failure": sft.get("failure"), "objective": config.objective, "config": asdict(config),
                       "stages": {"sft": _stage_summary(sft)}, "wall_time_s": time.time() - started}
            write_metrics(output_dir, metrics)
            return metrics
        start_adapter = output_dir / SFT_STAGE_DIR / "adapter"
    # The general replay examples of the training data: the preference stage's KL anchor (trainer/anchor.py).
    anchors = [ex for ex in examples if is_anchor(ex)] if config.kl_weight > 0 else []
    metrics = _train_preference(stage, preference, output_dir, base, start_adapter, held_out, anchors, config, force,
                                started)
    if start_adapter is not None and "fallback" not in metrics:  # a resumed fallback is already final
        metrics["stages"] = {"sft": _stage_summary(sft)}
        why = _refusal(metrics, config)
        if why and _refusal(sft, config) is None:
            metrics = _fall_back_to_sft_stage(output_dir, sft, metrics, why, preference, config)
        write_metrics(output_dir, metrics)
    return metrics


def _sft_stage(train, data, stage_dir: Path, base, eval_data, replay, config: TrainConfig, force: bool,
               sft_run: str | Path | None) -> dict:
    """The SFT stage's metrics: `sft_run` linked in and found finished by the stage's own contract, else trained."""
    def run(force: bool) -> dict:
        return train(data, stage_dir, base=base, eval_data=eval_data, replay=replay,
                     config=replace(config, objective="sft"), force=force)

    source = Path(sft_run) if sft_run is not None else None
    found = finished_metrics(source) if source is not None else None
    if found is None or stage_dir.exists():
        return run(force)
    _link_tree(source, stage_dir)
    try:
        sft = run(False)  # under another contract the linked run is removed whole below, not cleared in place
    except ResumeMismatchError as exc:
        log.warning("%s is not this SFT stage's run, so the stage trains: %s", source, exc)
        shutil.rmtree(stage_dir)
        return run(force)
    if sft == found:
        sft["reused"] = str(source)
        write_metrics(stage_dir, sft)  # replaces the linked file: the source run's own stays as it was
    return sft


def _link_tree(source: Path, target: Path) -> None:
    """A finished run's files under `target`, hard-linked (copied where links fail), whole or not at all.

    Links are safe because a run's files are replaced, never rewritten in place (write_metrics, the contract,
    the Trainer's checkpoints)."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    partial = target.with_name(target.name + ".linking")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, copy_function=link)
    os.replace(partial, target)


def _refusal(metrics: dict, config: TrainConfig) -> str | None:
    """Why the gate's rules (as the best-epoch judge applies them) would refuse this run; None if they would not."""
    if metrics.get("status") != "ok":
        return f"it failed: {metrics.get('reason')}"
    held_out = metrics.get("eval_loss")
    if held_out is None or not math.isfinite(held_out):
        return f"no finite held-out loss ({held_out})"
    start = metrics.get("eval_loss_start")
    if start is not None and math.isfinite(start) and held_out >= start:
        # The gate promotes only a held-out loss below the current version's, which the starting weights are.
        return f"held-out loss {held_out:.4f} is not below the starting weights' {start:.4f}"
    return forgetting({k: metrics.get(k) for k in ("regression_loss", "general_kept")},
                      metrics.get("regression_loss_start"), config.regression_tolerance, config.min_general_kept)


def _fall_back_to_sft_stage(output_dir: Path, sft: dict, refused: dict, why: str, preference: PreferenceData,
                            config: TrainConfig) -> dict:
    """The variant's result when its preference stage broke what the SFT stage learned: the SFT stage itself.

    A strong preference update can undo a good SFT stage (DPO at the SFT learning rate drove held-out loss
    from 0.26 to 7); the gate would refuse the variant and the cycle would lose what SFT taught. The SFT
    stage's adapter, numbers and preference measure stand instead, and the refused stage is kept beside them.
    """
    sft = add_measures(output_dir / SFT_STAGE_DIR, sft, preference, config)
    stage = config.objective.split("+", 1)[1]
    metrics = dict(sft)
    metrics.update(
        objective=config.objective,
        adapter_dir=f"{SFT_STAGE_DIR}/{ADAPTER_DIR}",
        reason=f"the {stage.upper()} stage was refused ({why}); the variant is its SFT stage",
        fallback={"to": SFT_STAGE_DIR, "reason": why},
        stages={SFT_STAGE_DIR: _stage_summary(sft),
                stage: _stage_summary(refused) | {"preference": refused.get("preference")}},
        wall_time_s=refused.get("wall_time_s"),
    )
    log.warning("%s: %s", output_dir, metrics["reason"])
    return metrics


def _stage_summary(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in ("status", "reason", "steps", "eval_loss", "regression_loss",
                                        "train_loss_final", "best_epoch", "tokens_per_s", "wall_time_s", "reused")}


def _train_preference(stage: str, preference: PreferenceData, output_dir: Path, base, start_adapter: Path | None,
                      held_out: list, anchors: list, config: TrainConfig, force: bool, started: float) -> dict:
    rows = preference.pairs if stage == "dpo" else preference.labels
    identity = {"start_adapter": _fingerprint(start_adapter)}
    if anchors:
        identity["anchor_examples"] = data_hash(anchors)
    run = open_run(output_dir, base, config, _rows_hash(rows), data_hash(held_out), force, started,
                   identity=identity)
    if run.finished is not None:
        return run.finished
    run.failure_fields = {"objective": config.objective}

    tokenizer = load_tokenizer(run.base_path)
    dataset_rows, tokenized = tokenize_preference(tokenizer, rows, stage, config.max_length)
    anchor_rows = tokenize_examples(tokenizer, anchors, config.max_length).rows
    if not dataset_rows:
        raise PreferenceSkipped(f"no {stage.upper()} row has a prompt shorter than max_length={config.max_length}")
    checkpoint = run.checkpoint()
    trainer, guard, result = run.fit(
        lambda: build_preference_trainer(stage, run.base_path, start_adapter, tokenizer, dataset_rows, output_dir,
                                         config, anchor_rows),
        checkpoint, held_out, tokenizer)
    model = trainer.model
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # the frozen reference is not part of the result

    def preference_report() -> dict:
        metrics = report(trainer, guard, tokenizer, result, config, output_dir, run.base_path, started, rows,
                         held_out, tokenized, TokenizedSet([], 0, 0, 0), checkpoint, len(rows))
        metrics["objective"] = config.objective
        if metrics["status"] == "ok":
            metrics["preference"] = preference_measures(model, tokenizer, preference, config)
        write_metrics(output_dir, metrics)
        return metrics

    return run.finish(preference_report)


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
