"""What a run leaves in its directory: metrics.json, the adapter, the loss curve (every objective the same).

Contract: ``write_metrics(dir, metrics)`` replaces DIR/metrics.json atomically (strict JSON: non-finite
numbers must already be None, ``finite`` makes them so). ``finished_metrics(dir)`` is that file when the run
needs no more training (succeeded with its adapter saved, or diverged, which is final), else None: a resume
trains again. ``report(...)`` is called on the main process once a run has trained: it saves the adapter
atomically (only when the divergence guard did not stop the run, or an epoch judged before it stopped is
kept: trainer/best_epoch.py), computes the held-out and regression
losses of the adapter and of the starting weights and the general-answers probe, writes metrics.json and
draws loss_curve.png, and returns the metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from trainer.base_model import base_identity
from trainer.config import TrainConfig
from trainer.evaluate import eval_loss, regression_examples, start_loss

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"
DIVERGED = "diverged"  # failure kind of a NaN/exploding run: final, such a run is never retried or chosen


def adapter_subdir(metrics: dict) -> str:
    """Where, under the run directory, a succeeded run's adapter is: metrics' ``adapter_dir`` (an ``sft+X`` run
    that fell back to its SFT stage names that stage's adapter: trainer/preference.py), else ADAPTER_DIR."""
    return metrics.get("adapter_dir") or ADAPTER_DIR


def finished_metrics(output_dir: Path) -> dict | None:
    """Metrics of a run that needs no more training: succeeded (adapter saved) or diverged (final)."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if metrics.get("status") == "ok" and (output_dir / adapter_subdir(metrics) / "adapter_config.json").is_file():
        return metrics
    if metrics.get("status") == "failed" and metrics.get("failure") == DIVERGED:
        return metrics
    return None  # e.g. an error or a kill: train (resume) again


def report(trainer, guard, tokenizer, result, config: TrainConfig, output_dir: Path, base_path: str,
            started: float, train_examples: list, held_out: list, train_set, eval_set, checkpoint,
            new_count: int) -> dict:
    """Save the adapter (if the run succeeded), compute the losses, write metrics.json and the PNG."""
    import torch

    from trainer.best_epoch import discard_epoch_adapters, read_scores, rescued, restore_best
    from trainer.compose import is_pair
    from trainer.general_kept import KeptProbe
    from trainer.plots import plot_run

    history = trainer.state.log_history
    # Non-finite losses become null: metrics.json stays strict JSON (the reason says what happened).
    train_curve = [[h["step"], finite(float(h["loss"]))] for h in history if "loss" in h]
    eval_curve = [[h["step"], finite(float(h["eval_loss"]))] for h in history if "eval_loss" in h]
    tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), 0)
    runtime = (result.metrics or {}).get("train_runtime") or 0.0
    paired = sum(map(is_pair, train_examples))
    # A diverged run whose epoch judge kept an epoch from before the divergence serves that epoch (best_epoch.py).
    kept_before = rescued(output_dir) if guard.reason is not None and config.select_best_epoch else None
    failed = guard.reason is not None and kept_before is None
    model = trainer.model
    losses: dict = {}
    adapter = output_dir / ADAPTER_DIR
    if adapter.exists():
        shutil.rmtree(adapter)
    best_epoch = None
    if not failed:
        best_epoch = restore_best(model, output_dir) if config.select_best_epoch else None
        save_adapter(model, tokenizer, adapter, base_path)
        discard_epoch_adapters(output_dir)
        regression = regression_examples(config.regression_set or None)
        # The epoch judge already scored these very weights (the restored best epoch, or the last one when it
        # ended the run) and the starting weights, on the same sets with the same function: reuse its figures.
        scores = read_scores(output_dir) if config.select_best_epoch else {}
        epochs = scores.get("epochs") or []
        judged = best_epoch or next((r for r in epochs if r.get("step") == trainer.state.global_step), None)
        start = scores.get("start") or {}
        for name, examples in (("eval_loss", held_out), ("regression_loss", regression)):
            if examples:
                losses[name] = (judged[name] if judged and judged.get(name) is not None else
                                eval_loss(model, examples, tokenizer, config.max_length, config.batch_size))
                losses[f"{name}_start"] = (start[name] if start.get(name) is not None else
                                           start_loss(model, examples, tokenizer, config.max_length,
                                                      config.batch_size, base_path))
        kept_probe = KeptProbe.for_run(output_dir, model, tokenizer, regression, config.max_length, base_path)
        # Greedy answers of the same weights do not change either: reuse the judge's general answers kept.
        losses["general_kept"] = (judged["general_kept"] if judged and judged.get("checked", "general_kept" in judged)
                                  else kept_probe.share(model, tokenizer))
        losses["general_right_start"] = len(kept_probe.right)
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    metrics = {
        "status": "failed" if failed else "ok",
        "reason": (f"{guard.reason}; epoch {kept_before['epoch']} (step {kept_before['step']}), judged before it, "
                   "kept" if kept_before else guard.reason),
        "failure": DIVERGED if failed else None,
        "config": asdict(config),
        "base": base_identity(base_path),
        "adapter_dir": ADAPTER_DIR if not failed else None,
        "steps": trainer.state.global_step,
        "resumed_from": checkpoint.name if checkpoint else None,
        "examples": {"train": len(train_examples), "new": new_count, "paired": paired,
                     "replayed": len(train_examples) - new_count - paired,
                     "eval": len(held_out), "truncated": train_set.truncated + eval_set.truncated,
                     "dropped": train_set.dropped + eval_set.dropped, "train_tokens": train_set.tokens},
        "train_loss_curve": train_curve,
        "eval_loss_curve": eval_curve,
        "train_loss_final": train_curve[-1][1] if train_curve else None,
        # The judge's score of every epoch, and the earlier epoch kept instead of the last (None: the last).
        "epoch_scores": read_scores(output_dir).get("epochs") if not failed else None,
        "best_epoch": best_epoch,
        "eval_loss": finite(losses.get("eval_loss")),
        "eval_loss_start": finite(losses.get("eval_loss_start")),
        "regression_loss": finite(losses.get("regression_loss")),
        "regression_loss_start": finite(losses.get("regression_loss_start")),
        # Share of the general answers the starting weights gave right that are still given (None: none were).
        "general_kept": finite(losses.get("general_kept")),
        "general_right_start": losses.get("general_right_start"),
        "tokens_per_s": tokens / runtime if runtime > 0 and tokens else None,
        "train_time_s": runtime,
        "wall_time_s": time.time() - started,
        # ru_maxrss is in KiB on Linux: the peak of this whole process, model loading included.
        "peak_memory_mb": {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cuda": peak_cuda},
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "world_size": trainer.args.world_size,
    }
    write_metrics(output_dir, metrics)
    try:
        plot_run(metrics, output_dir / "loss_curve.png")
    except Exception as exc:  # noqa: BLE001 - a missing picture must not fail a finished run
        log.warning("could not draw the loss curve: %s", exc)
    return metrics


def save_adapter(model, tokenizer, adapter: Path, base_path: str) -> None:
    """Write the LoRA adapter + tokenizer atomically (temp dir + rename): a kill leaves no half adapter."""
    tmp = adapter.with_name(adapter.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    config_path = tmp / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_path  # merge/export and eval find the base from here
    config_path.write_text(json.dumps(adapter_config, indent=2))
    os.replace(tmp, adapter)


def write_metrics(output_dir: Path, metrics: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, default=str, allow_nan=False))
    os.replace(tmp, output_dir / METRICS_FILE)


def finite(value):
    return value if isinstance(value, float) and math.isfinite(value) else None
