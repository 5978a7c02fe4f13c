"""The run preamble and the fit every objective shares (SFT in trainer/train.py, DPO/KTO in trainer/preference.py).

Contract, in the order a run uses it:

- ``check_config(config, *problems)``: the config (default TrainConfig()) once valid, else one ConfigError
  listing every problem (the caller's own `problems` included).
- ``open_run(output_dir, base, config, data_hash, eval_hash, force)``: the process-wide distributed state
  (accelerate's PartialState, cpu=True on a CPU machine so that launched processes there are data-parallel),
  the base resolved (by one process first), the resume contract checked or started (trainer/resume.py;
  ``identity`` adds to the base's identity, e.g. the start adapter of a preference run), and the
  finished metrics when the directory already holds this run done: a ``Run``.
- ``load_tokenizer(base_path)``, ``Run.checkpoint()`` (the newest complete checkpoint when resuming).
- ``Run.fit(build, checkpoint, held_out)``: builds the Trainer (``build()`` -> (trainer, guard)), adds the
  best-epoch judge when ``config.select_best_epoch`` and `held_out`, trains exactly once (resuming from
  `checkpoint`); an exception is recorded in metrics.json as failed (the ``failure_fields`` added), an out
  of GPU memory re-raised as TrainingError with advice.
- ``Run.finish(report)``: the main process reports, every process waits, the others read its metrics.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loop.core.errors import ConfigError, LoopError
from trainer.config import TrainConfig
from trainer.run_report import finished_metrics, write_metrics

log = logging.getLogger(__name__)


class TrainingError(LoopError, RuntimeError):
    """Training could not run (e.g. out of GPU memory); the message says what to change."""


def check_config(config: TrainConfig | None, *problems: str) -> TrainConfig:
    """`config` (TrainConfig() when None) if it and the caller's `problems` are clean; else a ConfigError."""
    config = config or TrainConfig()
    found = config.validate() + list(problems)
    if found:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(found))
    return config


@dataclass
class Run:
    """One run directory being trained by every process (see the module docstring)."""

    output_dir: Path
    config: TrainConfig
    state: Any  # accelerate.PartialState
    base_path: str
    may_resume: bool
    started: float
    finished: dict | None = None
    failure_fields: dict = field(default_factory=dict)

    def checkpoint(self) -> Path | None:
        from trainer.resume import newest_complete_checkpoint

        with self.state.main_process_first():  # torn checkpoints are moved aside once, by the main process
            checkpoint = newest_complete_checkpoint(self.output_dir) if self.may_resume else None
        if checkpoint is not None:
            log.info("resuming from %s", checkpoint)
        return checkpoint

    def fit(self, build: Callable[[], tuple[Any, Any]], checkpoint: Path | None, held_out: list,
            tokenizer) -> tuple[Any, Any, Any]:
        """(trainer, guard, train() result); see the module docstring."""
        config = self.config
        try:
            trainer, guard = build()
            if config.select_best_epoch and held_out:
                from trainer.best_epoch import make_callback
                from trainer.evaluate import regression_examples

                trainer.add_callback(make_callback(self.output_dir, tokenizer, held_out,
                                                   regression_examples(config.regression_set or None), config,
                                                   guard, self.base_path))
            # Exactly one call: resuming *is* the training (the seed project called train() again afterwards).
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except Exception as exc:  # noqa: BLE001 - OOM is re-raised with advice, anything else recorded then re-raised
            reason = oom_advice(exc, config) if is_oom(exc) else f"{type(exc).__name__}: {exc}"
            if self.state.is_main_process:
                write_metrics(self.output_dir, {"status": "failed", "reason": reason, "failure": "error",
                                                **self.failure_fields, "config": asdict(config),
                                                "wall_time_s": time.time() - self.started})
            if is_oom(exc):
                raise TrainingError(reason) from exc
            raise
        return trainer, guard, result

    def finish(self, report: Callable[[], dict]) -> dict:
        metrics = report() if self.state.is_main_process else {}
        self.state.wait_for_everyone()
        if not self.state.is_main_process:
            metrics = finished_metrics(self.output_dir) or {}
        return metrics


def open_run(output_dir: Path, base, config: TrainConfig, data_hash: str, eval_hash: str, force: bool,
             started: float, identity: dict | None = None) -> Run:
    """The distributed state, the base, the resume contract checked (module docstring)."""
    import torch
    from accelerate import PartialState

    from trainer.base_model import base_identity, resolve_base
    from trainer.resume import TrainingProgress, check_or_start

    # The process-wide distributed state (a singleton: the Trainer reuses it). cpu=True on a CPU machine is
    # what makes `accelerate launch`/torchrun processes there data-parallel (gloo) instead of independent.
    state = PartialState(cpu=not torch.cuda.is_available())
    with state.main_process_first():  # one process converts the bundled GGUF, the others then reuse it
        base_path = resolve_base(base)
    progress = TrainingProgress(config=config.resume_fields(), data_hash=data_hash, eval_hash=eval_hash,
                                base=dict(base_identity(base_path), **(identity or {})),
                                world_size=state.num_processes)
    may_resume = check_or_start(output_dir, progress, force, write=state.is_main_process)
    state.wait_for_everyone()
    run = Run(output_dir, config, state, base_path, may_resume, started)
    run.finished = finished_metrics(output_dir) if may_resume else None
    if run.finished is not None:
        log.info("%s already finished (status %s); not training again", output_dir, run.finished["status"])
    return run


def load_tokenizer(base_path: str):
    """The base's tokenizer, offline, with the end-of-sequence token as padding when it has none."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def oom_advice(exc: BaseException, config: TrainConfig) -> str:
    return (
        "the GPU ran out of memory. Lower, in this order: trainer.batch_size (now "
        f"{config.batch_size}; raise trainer.grad_accum to keep the effective batch), trainer.max_length (now "
        f"{config.max_length}), trainer.lora_rank (now {config.lora_rank}); or use trainer.cuda_precision = 'qlora' "
        f"(now {config.cuda_precision!r}) and trainer.gradient_checkpointing = true (now "
        f"{config.gradient_checkpointing}). ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    )
