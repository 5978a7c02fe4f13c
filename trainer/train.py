"""One LoRA fine-tuning run: library API `train(...)` and the `python -m trainer.train` command.

A thin main in the torchtune manner: set up (data, contract, model), train once (resuming from the newest
complete checkpoint when the run directory holds this same run), then clean up (adapter, metrics.json,
loss_curve.png). Works as well under ``accelerate launch -m trainer.train ...`` (data parallel): every
process trains, only the main one writes the contract, the adapter and the report.

Run directory layout::

    DIR/training_progress.json   the resume contract (trainer/resume.py)
    DIR/checkpoint-<step>/       Trainer checkpoints (every save_steps, last save_total_limit kept)
    DIR/adapter/                 the final LoRA adapter + tokenizer (only when the run succeeded)
    DIR/metrics.json             status ok|failed (+ reason), losses, curves, speed, memory
    DIR/loss_curve.png           the curves, for people
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path

from loop.core.errors import LoopError, error_exit
from trainer.compose import with_pairs
from trainer.config import TrainConfig, load_train_config
from trainer.data import (
    DataError,
    build_training_set,
    data_hash,
    load_examples,
    require_enough,
    split_eval,
    tokenize_examples,
)
from trainer.run_report import ADAPTER_DIR, DIVERGED, METRICS_FILE, report, write_metrics
from trainer.run_setup import TrainingError, check_config, load_tokenizer, open_run
from trainer.sft_trainer import build_trainer

__all__ = ["ADAPTER_DIR", "DIVERGED", "METRICS_FILE", "TrainingError", "build_trainer", "config_from_args", "main",
           "train"]


def train(data: str | Path | list[dict], output_dir: str | Path, *, base: str | Path | None = None,
          eval_data: str | Path | list[dict] | None = None, replay: str | Path | list[dict] | None = None,
          config: TrainConfig | None = None, force: bool = False) -> dict:
    """Fine-tune a LoRA adapter on chat examples; return the run's metrics (also in DIR/metrics.json).

    `data`, `eval_data`, `replay`: JSON-lines paths or lists of examples. Without `eval_data` a share of
    `data` (config.eval_fraction) is held out. `replay`: earlier curated examples mixed in at
    config.replay_ratio. `base`: HF directory or model id to start from (None: the bundled SmolLM2).
    A run directory already holding this run resumes it (or returns its finished metrics); one holding a
    different run is a ResumeMismatchError unless `force`, which starts over.
    """
    started = time.time()
    objective = (config or TrainConfig()).objective
    config = check_config(config, *([] if objective == "sft" else [
        f"train() runs SFT; objective {objective!r} runs through trainer.preference.train_objective"]))
    output_dir = Path(output_dir)

    new = examples_of(data)
    if eval_data is None:
        new, held_out = split_eval(new, config.eval_fraction, config.seed)
    else:
        held_out = examples_of(eval_data)
    train_examples = build_training_set(new, examples_of(replay), config.replay_ratio, config.seed) if replay else new
    require_enough(train_examples, config.min_examples)  # pairs only restate these: they never make up the count
    train_examples = with_pairs(train_examples, config.pair_share, config.seed)

    run = open_run(output_dir, base, config, data_hash(train_examples), data_hash(held_out), force, started)
    if run.finished is not None:
        return run.finished

    tokenizer = load_tokenizer(run.base_path)
    train_set = tokenize_examples(tokenizer, train_examples, config.max_length, anchor=config.kl_weight > 0,
                                  words=config.question_dropout > 0)
    eval_set = tokenize_examples(tokenizer, held_out, config.max_length)
    if not train_set.rows:
        raise DataError(f"no training example has answer tokens within max_length={config.max_length}")

    checkpoint = run.checkpoint()
    trainer, guard, result = run.fit(
        lambda: build_trainer(run.base_path, tokenizer, train_set.rows, eval_set.rows, output_dir, config),
        checkpoint, held_out if eval_set.rows else [], tokenizer)
    metrics = run.finish(partial(report, trainer, guard, tokenizer, result, config, output_dir, run.base_path,
                                 started, train_examples, held_out, train_set, eval_set, checkpoint, len(new)))
    del trainer
    gc.collect()
    return metrics


def examples_of(source) -> list[dict]:
    """Examples from a JSON-lines path or a list ([] for None)."""
    if source is None:
        return []
    if isinstance(source, (str, Path)):
        return load_examples(source)
    return list(source)


# ---------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.train",
        description="Fine-tune a LoRA adapter on chat examples (JSON lines). Resumes from the newest complete "
                    "checkpoint in --output; writes DIR/adapter, DIR/metrics.json and DIR/loss_curve.png.")
    parser.add_argument("--data", required=True, help="training examples, JSON lines {'id', 'messages'}")
    parser.add_argument("--output", required=True, help="run directory (checkpoints, adapter, report)")
    parser.add_argument("--base", help="HF model directory or id to start from (default: the bundled SmolLM2)")
    parser.add_argument("--eval", help="held-out examples (default: hold out eval_fraction of --data)")
    parser.add_argument("--replay", help="earlier curated examples to mix in at replay_ratio")
    parser.add_argument("--config", help="TOML file whose [trainer] table configures the run (default: $LOOP_CONFIG "
                                          "or $LOOP_HOME/config.toml; LOOP_TRAINER__<FIELD> variables override it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="trainer.FIELD=VALUE",
                        help="override one TrainConfig field, after the file and the environment; VALUE is a TOML "
                             "literal (40, 1e-3, true, [16, 64]; a bare word is a string). Repeatable.")
    parser.add_argument("--preference", help="directory with pairs.jsonl/labels.jsonl (+ eval_*), e.g. a snapshot")
    parser.add_argument("--force", action="store_true",
                        help="discard a different run found in --output and start over")
    parser.add_argument("--json", action="store_true", help="print metrics.json to stdout when done")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: --config's [trainer] table, the environment, then every --set (ConfigError: all
    the bad keys at once)."""
    return load_train_config(args.config, overrides=args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:  # every bad key at once, before the training stack is imported
        config = config_from_args(args)
    except LoopError as exc:
        return error_exit(exc, 2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trainer.preference import PreferenceSkipped, train_objective

    try:
        metrics = train_objective(args.data, args.output, base=args.base, eval_data=args.eval, replay=args.replay,
                                  preference=args.preference, config=config, force=args.force)
    except PreferenceSkipped as exc:
        if not (Path(args.output) / METRICS_FILE).exists():  # never over an earlier run's report
            write_metrics(Path(args.output), {"status": "skipped", "reason": str(exc)})
        print(f"skipped: {exc}", file=sys.stderr)
        return 3
    except LoopError as exc:  # a bad config, unusable data, a resume mismatch, a failed run
        return error_exit(exc, 2)
    if args.json and metrics:
        print(json.dumps(metrics, indent=2))
    if metrics.get("status") != "ok":
        print(f"run failed: {metrics.get('reason')}", file=sys.stderr)
        return 1
    summary = {k: metrics.get(k) for k in ("eval_loss", "eval_loss_start", "regression_loss",
                                           "regression_loss_start", "tokens_per_s", "wall_time_s")}
    print(f"done: {Path(args.output) / ADAPTER_DIR} {json.dumps(summary)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
