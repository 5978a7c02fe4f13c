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
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from loop.core.errors import ConfigError, LoopError, error_exit
from trainer.base_model import base_identity, resolve_base
from trainer.config import OBJECTIVES, TrainConfig
from trainer.data import (
    DataError,
    build_training_set,
    data_hash,
    load_examples,
    require_enough,
    split_eval,
    tokenize_examples,
)
from trainer.evaluate import eval_loss, regression_examples
from trainer.resume import TrainingProgress, check_or_start, newest_complete_checkpoint

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"
DIVERGED = "diverged"  # failure kind of a NaN/exploding run: final, such a run is never retried or chosen


class TrainingError(LoopError, RuntimeError):
    """Training could not run (e.g. out of GPU memory); the message says what to change."""


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
    config = config or TrainConfig()
    problems = config.validate()
    if config.objective != "sft":
        problems.append(f"train() runs SFT; objective {config.objective!r} runs through "
                        "trainer.preference.train_objective")
    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))
    output_dir = Path(output_dir)

    import torch
    from accelerate import PartialState

    # The process-wide distributed state (a singleton: the Trainer reuses it). cpu=True on a CPU machine is
    # what makes `accelerate launch`/torchrun processes there data-parallel (gloo) instead of independent.
    state = PartialState(cpu=not torch.cuda.is_available())
    new = _examples(data)
    if eval_data is None:
        new, held_out = split_eval(new, config.eval_fraction, config.seed)
    else:
        held_out = _examples(eval_data)
    train_examples = build_training_set(new, _examples(replay), config.replay_ratio, config.seed) if replay else new
    require_enough(train_examples, config.min_examples)

    with state.main_process_first():  # one process converts the bundled GGUF, the others then reuse it
        base_path = resolve_base(base)
    progress = TrainingProgress(config=config.resume_fields(), data_hash=data_hash(train_examples),
                                eval_hash=data_hash(held_out), base=base_identity(base_path),
                                world_size=state.num_processes)
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
    train_set = tokenize_examples(tokenizer, train_examples, config.max_length)
    eval_set = tokenize_examples(tokenizer, held_out, config.max_length)
    if not train_set.rows:
        raise DataError(f"no training example has answer tokens within max_length={config.max_length}")

    with state.main_process_first():  # torn checkpoints are moved aside once, by the main process
        checkpoint = newest_complete_checkpoint(output_dir) if may_resume else None
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    try:
        trainer, guard = build_trainer(base_path, tokenizer, train_set.rows, eval_set.rows, output_dir, config)
        if config.select_best_epoch and eval_set.rows:
            from trainer.best_epoch import make_callback

            trainer.add_callback(make_callback(output_dir, tokenizer, held_out,
                                               regression_examples(config.regression_set or None), config))
        # Exactly one call: resuming *is* the training (the seed project called train() again afterwards).
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as exc:  # noqa: BLE001 - OOM is re-raised with advice, anything else recorded then re-raised
        reason = _oom_advice(exc, config) if _is_oom(exc) else f"{type(exc).__name__}: {exc}"
        if state.is_main_process:
            _write_metrics(output_dir, {"status": "failed", "reason": reason, "failure": "error",
                                        "config": asdict(config), "wall_time_s": time.time() - started})
        if _is_oom(exc):
            raise TrainingError(reason) from exc
        raise

    metrics = {}
    if state.is_main_process:
        metrics = _report(trainer, guard, tokenizer, result, config, output_dir, base_path, started,
                          train_examples, held_out, train_set, eval_set, checkpoint, len(new))
    state.wait_for_everyone()
    del trainer
    gc.collect()
    if not state.is_main_process:
        metrics = _finished_metrics(output_dir) or {}
    return metrics


def _examples(source) -> list[dict]:
    if source is None:
        return []
    if isinstance(source, (str, Path)):
        return load_examples(source)
    return list(source)


def _finished_metrics(output_dir: Path) -> dict | None:
    """Metrics of a run that needs no more training: succeeded (adapter saved) or diverged (final)."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if metrics.get("status") == "ok" and (output_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return metrics
    if metrics.get("status") == "failed" and metrics.get("failure") == DIVERGED:
        return metrics
    return None  # e.g. an error or a kill: train (resume) again


def build_trainer(base_path: str, tokenizer, train_rows: list, eval_rows: list, output_dir: Path,
                   config: TrainConfig):
    """(SFTTrainer, divergence guard) for tokenised rows ({"input_ids", "labels"}); train() drives it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    model = _load_model(base_path, config, cuda)
    peft_config = LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
                             target_modules=config.target_modules_value(), bias="none", task_type="CAUSAL_LM")
    sft_kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,  # the default hides NaN losses from the log, and so from the guard
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if eval_rows else "no",
        eval_steps=config.save_steps,
        report_to="none",
        max_length=config.max_length,
        packing=False,
        gradient_checkpointing=config.gradient_checkpointing,
        neftune_noise_alpha=config.neftune_noise_alpha or None,
        bf16=cuda,
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,  # LoRA: every adapter gets a gradient; skip DDP's graph walk
        dataloader_num_workers=0,
    )
    if cuda:
        _apply_cuda_fast(sft_kwargs, model, config, train_rows)
    guard_class, injector_class = _callbacks()
    callbacks = [guard_class(config.loss_explode_factor, getattr(model.config, "vocab_size", None))]
    if config.inject_nan_at_step:
        callbacks.append(injector_class(model, config.inject_nan_at_step))
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**sft_kwargs),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    return trainer, callbacks[0]


def _callbacks():
    """The run's TrainerCallback classes (defined here so importing this module does not load transformers)."""
    from transformers import TrainerCallback

    class _DivergenceGuard(TrainerCallback):
        """Stops a run whose loss turns NaN/inf, explodes or collapses to chance level; remembers why."""

        def __init__(self, explode_factor: float, vocab_size: int | None):
            self.explode_factor = explode_factor
            # Uniform guessing over the vocabulary scores ln(V) per token; a pretrained model is far below
            # that, so reaching 90% of it means the weights were wrecked (what lr=1e9 does: loss 10.8 = ln 49152).
            self.chance_loss = math.log(vocab_size) if vocab_size else math.inf
            self.first_loss: float | None = None
            self.reason: str | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            # On resume the reference is the run's first logged loss, not the first after the restart.
            self.first_loss = next((h["loss"] for h in state.log_history if "loss" in h), None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or self.reason:
                return
            loss, grad_norm, step = float(logs["loss"]), logs.get("grad_norm"), state.global_step
            # Single small batches are noisy (an easy first batch can score 0.3): the reference is >= 1 nat.
            reference = max(self.first_loss if self.first_loss is not None else loss, 1.0)
            if not math.isfinite(loss):
                self.reason = f"loss became {loss} at step {step}"
            elif grad_norm is not None and not math.isfinite(float(grad_norm)):
                self.reason = f"gradient norm became {grad_norm} at step {step}"
            elif loss >= 0.9 * self.chance_loss:
                self.reason = (f"loss collapsed to {loss:.4g} at step {step}, the level of guessing uniformly "
                               f"over the vocabulary ({self.chance_loss:.4g}): the weights diverged")
            elif loss > self.explode_factor * reference:
                self.reason = (f"loss exploded to {loss:.4g} at step {step} (more than "
                               f"{self.explode_factor:g} x the reference {reference:.4g})")
            if self.first_loss is None:
                self.first_loss = loss
            if self.reason:
                log.error("stopping: %s", self.reason)
                # Stop now, and keep the diverged weights out of any checkpoint or evaluation.
                control.should_training_stop = True
                control.should_save = False
                control.should_evaluate = False

    class _NanInjector(TrainerCallback):
        """Testing hook (train.inject_nan_at_step): NaN embeddings from that step on, through the real path."""

        def __init__(self, model, step: int):
            self.step, self.active = step, False
            model.get_input_embeddings().register_forward_hook(
                lambda module, inputs, output: output * float("nan") if self.active else None)

        def on_step_begin(self, args, state, control, **kwargs):
            self.active = state.global_step + 1 >= self.step

    return _DivergenceGuard, _NanInjector


def _load_model(base_path: str, config: TrainConfig, cuda: bool):
    import torch
    from transformers import AutoModelForCausalLM

    if not cuda:
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    from accelerate import PartialState

    device_map = {"": PartialState().local_process_index}  # one whole model per GPU (data parallel)
    if config.cuda_precision == "qlora":
        try:
            from transformers import BitsAndBytesConfig

            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.bfloat16,
                                              bnb_4bit_use_double_quant=True)
            return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16, device_map=device_map,
                                                        quantization_config=quantization)
        except ImportError as exc:
            raise TrainingError(
                f"QLoRA needs the bitsandbytes package ({exc}); install it or set train.cuda_precision = 'bf16'"
            ) from exc
    return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16, device_map=device_map)


def _apply_cuda_fast(sft_kwargs: dict, model, config: TrainConfig, train_rows: list) -> None:
    """The GPU fast path (padding-free batches, fused kernels) lives in trainer/cuda_fast.py when present."""
    try:
        from trainer import cuda_fast
    except ImportError:
        return
    cuda_fast.apply(sft_kwargs, model, config, train_rows=train_rows)


def _report(trainer, guard, tokenizer, result, config: TrainConfig, output_dir: Path, base_path: str,
            started: float, train_examples: list, held_out: list, train_set, eval_set, checkpoint,
            new_count: int) -> dict:
    """Save the adapter (if the run succeeded), compute the losses, write metrics.json and the PNG."""
    import torch

    from trainer.best_epoch import read_scores, restore_best
    from trainer.general_kept import KeptProbe
    from trainer.plots import plot_run

    history = trainer.state.log_history
    # Non-finite losses become null: metrics.json stays strict JSON (the reason says what happened).
    train_curve = [[h["step"], _finite(float(h["loss"]))] for h in history if "loss" in h]
    eval_curve = [[h["step"], _finite(float(h["eval_loss"]))] for h in history if "eval_loss" in h]
    tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), 0)
    runtime = (result.metrics or {}).get("train_runtime") or 0.0
    failed = guard.reason is not None
    model = trainer.model
    losses: dict = {}
    adapter = output_dir / ADAPTER_DIR
    if adapter.exists():
        shutil.rmtree(adapter)
    best_epoch = None
    if not failed:
        best_epoch = restore_best(model, output_dir) if config.select_best_epoch else None
        _save_adapter(model, tokenizer, adapter, base_path)
        regression = regression_examples(config.regression_set or None)
        for name, examples in (("eval_loss", held_out), ("regression_loss", regression)):
            if examples:
                losses[name] = eval_loss(model, examples, tokenizer, config.max_length, config.batch_size)
                losses[f"{name}_start"] = eval_loss(model, examples, tokenizer, config.max_length,
                                                    config.batch_size, disable_adapter=True)
        kept_probe = KeptProbe.for_run(output_dir, model, tokenizer, regression, config.max_length)
        losses["general_kept"] = kept_probe.share(model, tokenizer)
        losses["general_right_start"] = len(kept_probe.right)
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    metrics = {
        "status": "failed" if failed else "ok",
        "reason": guard.reason,
        "failure": DIVERGED if failed else None,
        "config": asdict(config),
        "base": base_identity(base_path),
        "adapter_dir": ADAPTER_DIR if not failed else None,
        "steps": trainer.state.global_step,
        "resumed_from": checkpoint.name if checkpoint else None,
        "examples": {"train": len(train_examples), "new": new_count, "replayed": len(train_examples) - new_count,
                     "eval": len(held_out), "truncated": train_set.truncated + eval_set.truncated,
                     "dropped": train_set.dropped + eval_set.dropped, "train_tokens": train_set.tokens},
        "train_loss_curve": train_curve,
        "eval_loss_curve": eval_curve,
        "train_loss_final": train_curve[-1][1] if train_curve else None,
        # The judge's score of every epoch, and the earlier epoch kept instead of the last (None: the last).
        "epoch_scores": read_scores(output_dir).get("epochs") if not failed else None,
        "best_epoch": best_epoch,
        "eval_loss": _finite(losses.get("eval_loss")),
        "eval_loss_start": _finite(losses.get("eval_loss_start")),
        "regression_loss": _finite(losses.get("regression_loss")),
        "regression_loss_start": _finite(losses.get("regression_loss_start")),
        # Share of the general answers the starting weights gave right that are still given (None: none were).
        "general_kept": _finite(losses.get("general_kept")),
        "general_right_start": losses.get("general_right_start"),
        "tokens_per_s": tokens / runtime if runtime > 0 and tokens else None,
        "train_time_s": runtime,
        "wall_time_s": time.time() - started,
        # ru_maxrss is in KiB on Linux: the peak of this whole process, model loading included.
        "peak_memory_mb": {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cuda": peak_cuda},
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "world_size": trainer.args.world_size,
    }
    _write_metrics(output_dir, metrics)
    try:
        plot_run(metrics, output_dir / "loss_curve.png")
    except Exception as exc:  # noqa: BLE001 - a missing picture must not fail a finished run
        log.warning("could not draw the loss curve: %s", exc)
    return metrics


def _save_adapter(model, tokenizer, adapter: Path, base_path: str) -> None:
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


def _write_metrics(output_dir: Path, metrics: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, default=str, allow_nan=False))
    os.replace(tmp, output_dir / METRICS_FILE)


def _finite(value):
    return value if isinstance(value, float) and math.isfinite(value) else None


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def _oom_advice(exc: BaseException, config: TrainConfig) -> str:
    return (
        "the GPU ran out of memory. Lower, in this order: train.batch_size (now "
        f"{config.batch_size}; raise train.grad_accum to keep the effective batch), train.max_length (now "
        f"{config.max_length}), train.lora_rank (now {config.lora_rank}); or use train.cuda_precision = 'qlora' "
        f"(now {config.cuda_precision!r}) and train.gradient_checkpointing = true (now "
        f"{config.gradient_checkpointing}). ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    )


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
    parser.add_argument("--config-json", help="a JSON object of TrainConfig fields (flags below override it)")
    parser.add_argument("--objective", choices=OBJECTIVES, help="train.objective (trainer/preference.py)")
    parser.add_argument("--preference", help="directory with pairs.jsonl/labels.jsonl (+ eval_*), e.g. a snapshot")
    flags = {"--lr": ("learning_rate", float), "--rank": ("lora_rank", int), "--alpha": ("lora_alpha", int),
             "--max-steps": ("max_steps", int), "--epochs": ("epochs", float), "--save-steps": ("save_steps", int),
             "--max-length": ("max_length", int), "--batch-size": ("batch_size", int),
             "--grad-accum": ("grad_accum", int), "--seed": ("seed", int), "--min-examples": ("min_examples", int),
             "--replay-ratio": ("replay_ratio", float)}
    for flag, (name, kind) in flags.items():
        parser.add_argument(flag, dest=name, type=kind, help=f"train.{name}")
    parser.add_argument("--force", action="store_true",
                        help="discard a different run found in --output and start over")
    parser.add_argument("--json", action="store_true", help="print metrics.json to stdout when done")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = TrainConfig()
    if args.config_json:
        raw = json.loads(Path(args.config_json).read_text())
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) in {args.config_json}: {unknown}")
        base = TrainConfig(**raw)
    overrides = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig)}
    return base.with_overrides(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trainer.preference import PreferenceSkipped, train_objective

    try:
        config = config_from_args(args)
        metrics = train_objective(args.data, args.output, base=args.base, eval_data=args.eval, replay=args.replay,
                                  preference=args.preference, config=config, force=args.force)
    except PreferenceSkipped as exc:
        if not (Path(args.output) / METRICS_FILE).exists():  # never over an earlier run's report
            _write_metrics(Path(args.output), {"status": "skipped", "reason": str(exc)})
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
