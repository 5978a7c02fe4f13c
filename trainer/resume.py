"""The resume contract: when a run directory may be resumed, and from which checkpoint.

Modelled on torchtune's ``TrainingProgress``: the first invocation writes ``training_progress.json`` into
the run directory with everything that must be the same for a resumption to continue the *same* run (the
config fields that shape the optimisation, the data's hash, the base model's identity). A later invocation
compares, and a mismatch is an error naming every differing field, unless forced, which starts the run
over. The checkpoints themselves are written by the transformers Trainer (``checkpoint-<step>/``, the last
``save_total_limit`` kept); a checkpoint torn by a kill mid-write is moved aside with a warning and the
newest complete one is used. Resumption is a single ``trainer.train(resume_from_checkpoint=...)`` call:
the seed project's snippet called ``train()`` a second time after resuming, training twice.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loop.core.errors import LoopError

log = logging.getLogger(__name__)

PROGRESS_FILE = "training_progress.json"
CONTRACT_VERSION = 1
TORN_DIR = "torn_checkpoints"  # not matching "checkpoint-*", so the Trainer's rotation never sees these
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class ResumeMismatchError(LoopError, RuntimeError):
    """The run directory holds a different run; the message lists every difference."""


@dataclass
class TrainingProgress:
    """What must match to resume a run. Stored as training_progress.json in the run directory."""

    config: dict  # TrainConfig.resume_fields()
    data_hash: str  # trainer.data.data_hash of the (mixed) training examples, in order
    eval_hash: str  # the same for the held-out examples (they decide which variant wins)
    base: dict  # trainer.base_model.base_identity of the starting weights
    version: int = CONTRACT_VERSION
    # Processes training together: the effective batch, and so the data order and the steps, depend on it.
    world_size: int = 1

    def save(self, run_dir: Path) -> None:
        path = Path(run_dir) / PROGRESS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        tmp.replace(path)  # atomic: a kill never leaves half a contract

    @classmethod
    def load(cls, run_dir: Path) -> TrainingProgress | None:
        path = Path(run_dir) / PROGRESS_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            return cls(**raw)
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ResumeMismatchError(
                f"{path} is unreadable ({exc}); pass --force to start this run over"
            ) from exc

    def differences(self, other: TrainingProgress) -> list[str]:
        """Human-readable differences between this (stored) contract and `other` (requested)."""
        diffs = []
        if self.version != other.version:
            diffs.append(f"contract version: stored {self.version}, now {other.version}")
        for key in sorted(set(self.config) | set(other.config)):
            old, new = self.config.get(key), other.config.get(key)
            if old != new:
                diffs.append(f"config {key}: stored {old!r}, now {new!r}")
        if self.data_hash != other.data_hash:
            diffs.append("training data: the examples (or their order/replay mix) differ from the stored run's")
        if self.eval_hash != other.eval_hash:
            diffs.append("eval data: the held-out examples differ from the stored run's")
        if self.world_size != other.world_size:
            diffs.append(f"processes: stored {self.world_size}, now {other.world_size} (the effective batch and "
                         "the data order depend on it)")
        if self.base != other.base:
            diffs.append(f"base model: stored {self.base.get('base')!r}, now {other.base.get('base')!r}"
                         + (" (same path, different files)" if self.base.get("base") == other.base.get("base") else ""))
        return diffs


def check_or_start(run_dir: Path, progress: TrainingProgress, force: bool, write: bool = True) -> bool:
    """Enforce the contract for `run_dir`; return True when an earlier run's state may be resumed.

    - no contract and no checkpoints: a fresh run (the contract is written);
    - same contract: resume (whatever checkpoints exist);
    - different contract, or checkpoints without a contract: ResumeMismatchError, or with `force`, the
      old run's state is deleted and a fresh run starts.

    `write=False` (the non-main processes of a data-parallel run) checks without touching the directory.
    """
    run_dir = Path(run_dir)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
    stored = None
    problem = None
    try:
        stored = TrainingProgress.load(run_dir)
    except ResumeMismatchError as exc:
        problem = str(exc)
    if stored is not None:
        diffs = stored.differences(progress)
        if not diffs:
            return True
        problem = (f"{run_dir} holds a different training run, so it cannot be resumed:\n  - "
                   + "\n  - ".join(diffs)
                   + "\nUse another output directory, or pass --force (force=True) to discard it and start over.")
    elif problem is None and list_checkpoints(run_dir):
        problem = (f"{run_dir} has checkpoints but no {PROGRESS_FILE}, so whether they belong to this run "
                   "cannot be checked; pass --force to discard them and start over")
    if problem is not None:
        if not force:
            raise ResumeMismatchError(problem)
        if write:
            log.warning("--force: discarding the previous run in %s", run_dir)
            clear_run(run_dir)
    if write:
        progress.save(run_dir)
    return False


def clear_run(run_dir: Path) -> None:
    """Delete a run's checkpoints, contract and outputs (not unrelated files a user put there)."""
    run_dir = Path(run_dir)
    outputs = [run_dir / TORN_DIR, run_dir / "adapter", run_dir / "epoch_adapters", run_dir / "best_epoch"]
    for path in list_checkpoints(run_dir) + outputs:
        shutil.rmtree(path, ignore_errors=True)
    for name in (PROGRESS_FILE, "metrics.json", "loss_curve.png", "best_epoch.json", "general_kept.json"):
        (run_dir / name).unlink(missing_ok=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-<step> directories, oldest first."""
    found = []
    for path in Path(run_dir).glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (torn or unreadable), or None when it is complete.

    The Trainer writes trainer_state.json last, so its presence means the writer got to the end; the
    adapter and optimizer are still loaded fully, because a kill or a full disk can leave a file short.
    """
    path = Path(path)
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (killed while saving?)"
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (OSError, json.JSONDecodeError) as exc:
        return f"trainer_state.json unreadable: {exc}"
    if f"checkpoint-{step}" != path.name:
        return f"trainer_state.json says step {step}, not {path.name}"
    adapter = path / "adapter_model.safetensors"
    if not adapter.is_file() or not (path / "adapter_config.json").is_file():
        return "adapter weights or config missing"
    try:
        from safetensors.torch import load_file

        load_file(str(adapter))
    except Exception as exc:  # noqa: BLE001 - any failure to read means torn
        return f"adapter weights unreadable: {exc}"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (path / name).is_file():
            return f"{name} missing"
    try:
        import torch

        torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        return f"optimizer.pt unreadable: {exc}"
    return None


def newest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest resumable checkpoint; torn ones found on the way are moved to torn_checkpoints/."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        torn = Path(run_dir) / TORN_DIR / f"{path.name}-{int(time.time())}"
        torn.parent.mkdir(exist_ok=True)
        log.warning("skipping torn checkpoint %s: %s (moved to %s)", path.name, problem, torn)
        shutil.move(str(path), str(torn))
    return None
