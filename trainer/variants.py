"""A grid of learning-rate x rank x objective variants, each its own resumable run, judged on held-out loss.

Variants run one after another in this process on a CPU or a single GPU; with several GPUs they run side
by side, one `python -m trainer.train` process per GPU. Each variant's directory is an ordinary run
directory (trainer/train.py), so a killed cycle resumes every unfinished variant and skips finished ones.
A failed variant (NaN or exploding loss, or an error) is reported but never chosen by `best_variant`.
A preference objective (trainer/preference.py) with nothing to learn from in the snapshot (no pairs, or
labels of one class only) is reported as ``skipped`` with the reason, never run and never chosen.
Run one after another, an ``sft+X`` variant takes the finished ``sft`` variant of its learning rate and rank
as its SFT stage instead of training the same run again (``train_objective``'s ``sft_run``).
The grid's report is written to out_root/variants.json and out_root/variants.png.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from loop.core.config import toml_table
from trainer.config import TrainConfig, VariantGrid

log = logging.getLogger(__name__)

REPORT_FILE = "variants.json"


@dataclass
class VariantResult:
    """One variant's outcome; `metrics` is its full metrics.json."""

    name: str
    learning_rate: float
    lora_rank: int
    lora_alpha: int
    run_dir: Path
    status: str  # "ok", "failed" or "skipped" (the objective had no data; reason says why)
    reason: str | None = None
    objective: str = "sft"
    eval_loss: float | None = None  # held-out loss on the answer tokens: what the best variant is chosen by
    regression_loss: float | None = None  # general-ability regression set: forgetting shows here
    eval_loss_start: float | None = None  # the same two losses of the starting weights, for comparison
    regression_loss_start: float | None = None
    general_kept: float | None = None  # share of the starting weights' right general answers still given
    train_loss_final: float | None = None
    tokens_per_s: float | None = None
    wall_time_s: float | None = None
    peak_memory_mb: dict = field(default_factory=dict)
    preference: dict = field(default_factory=dict)  # the preference measure (trainer/preference.py), if any
    metrics: dict = field(default_factory=dict)

    @property
    def adapter_dir(self) -> Path | None:
        """The trained LoRA adapter (merge/export input); None for a failed variant."""
        from trainer.run_report import adapter_subdir

        return self.run_dir / adapter_subdir(self.metrics) if self.status == "ok" else None

    @classmethod
    def from_metrics(cls, name: str, config: TrainConfig, run_dir: Path, metrics: dict) -> VariantResult:
        return cls(name=name, learning_rate=config.learning_rate, lora_rank=config.lora_rank,
                   lora_alpha=config.alpha, run_dir=Path(run_dir), status=metrics.get("status", "failed"),
                   reason=metrics.get("reason"), objective=config.objective, eval_loss=metrics.get("eval_loss"),
                   regression_loss=metrics.get("regression_loss"), eval_loss_start=metrics.get("eval_loss_start"),
                   regression_loss_start=metrics.get("regression_loss_start"),
                   general_kept=metrics.get("general_kept"),
                   train_loss_final=metrics.get("train_loss_final"), tokens_per_s=metrics.get("tokens_per_s"),
                   wall_time_s=metrics.get("wall_time_s"), peak_memory_mb=metrics.get("peak_memory_mb") or {},
                   preference=metrics.get("preference") or {}, metrics=metrics)

    def to_dict(self, with_metrics: bool = True) -> dict:
        """JSON-ready: every field, plus adapter_dir (None when failed) and wall_s (= wall_time_s)."""
        row = asdict(self)
        if not with_metrics:
            row.pop("metrics")
        row["run_dir"] = str(self.run_dir)
        row["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        row["wall_s"] = self.wall_time_s
        return row


def best_variant(results: list[VariantResult], regression_tolerance: float | None = None,
                 min_general_kept: float | None = None) -> VariantResult | None:
    """The succeeded variant with the lowest held-out loss (ties: lower regression loss); None if none did.

    A failed variant can never be chosen, whatever its numbers say. With `regression_tolerance` (e.g. 0.05),
    variants whose regression loss rose more than that fraction above their starting weights' are left out
    too, and with `min_general_kept` those that lost more general answers (trainer/general_kept.py), so a
    variant that learned the most by forgetting the most does not shadow one that would pass a gate.
    """
    def forgets_too_much(r: VariantResult) -> bool:
        if min_general_kept is not None and r.general_kept is not None and r.general_kept < min_general_kept:
            return True
        if regression_tolerance is None or r.regression_loss is None or r.regression_loss_start is None:
            return False
        return r.regression_loss > r.regression_loss_start * (1.0 + regression_tolerance)

    candidates = [r for r in results if r.status == "ok" and r.eval_loss is not None
                  and math.isfinite(r.eval_loss) and not forgets_too_much(r)]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r.eval_loss, r.regression_loss if r.regression_loss is not None
                                          else math.inf))


def run_variants(train_path: str | Path, eval_path: str | Path | None, base_dir: str | Path | None,
                 out_root: str | Path, grid: VariantGrid | TrainConfig | None = None,
                 config: TrainConfig | None = None, *, replay_path: str | Path | None = None,
                 force: bool = False, preference_dir: str | Path | None = None) -> list[VariantResult]:
    """Train every grid variant into out_root/<variant name>/ and report them all (failed ones included).

    `config` gives everything but the learning rate, rank and objective, which come from `grid` (default: the
    grid in `config`, i.e. config.learning_rates x config.lora_ranks x config.objectives). A TrainConfig
    passed in `grid`'s place is taken as `config`. `preference_dir`: the snapshot directory holding the
    pairs and labels files (trainer/preference.py); without it every preference objective is skipped.
    Bad input (too few examples, an invalid grid, malformed pairs/labels) raises before any variant starts.
    """
    if isinstance(grid, TrainConfig) and config is None:
        grid, config = None, grid
    config = config or TrainConfig()
    grid = grid or config.grid()
    problems = grid.validate()
    if problems:
        from loop.core.errors import ConfigError

        raise ConfigError("invalid variant grid:\n  - " + "\n  - ".join(problems))
    from trainer.preference import PreferenceData, skip_reason

    preference = PreferenceData.from_dir(preference_dir)
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    plan, skipped = [], {}
    for name, lr, rank, objective in grid.points():
        variant_config = replace(config, learning_rate=lr, lora_rank=rank, objective=objective)
        reason = skip_reason(objective, preference)
        if reason:
            log.warning("variant %s skipped: %s", name, reason)
            skipped[name] = VariantResult.from_metrics(name, variant_config, out_root / name,
                                                       {"status": "skipped", "reason": reason})
        else:
            plan.append((name, variant_config))

    gpus = _gpu_count()
    if gpus > 1 and len(plan) > 1:
        results = _run_on_gpus(plan, train_path, eval_path, base_dir, out_root, replay_path, force, gpus,
                               preference_dir)
    else:
        results = _run_here(plan, train_path, eval_path, base_dir, out_root, replay_path, force, preference)
    by_name = {r.name: r for r in results} | skipped
    results = [by_name[name] for name, *_ in grid.points()]
    write_report(results, out_root)
    return results


def _run_here(plan, train_path, eval_path, base_dir, out_root: Path, replay_path, force,
              preference=None) -> list[VariantResult]:
    from loop.core.errors import ConfigError
    from trainer.data import DataError
    from trainer.preference import PreferenceSkipped, train_objective
    from trainer.resume import ResumeMismatchError

    results = []
    sft_runs: dict[tuple[float, int], Path] = {}  # (lr, rank) -> a finished sft variant, the SFT stage of sft+X
    # The sft variants first, so each sft+X finds its SFT stage already trained; results keep the grid's order.
    for name, variant_config in tqdm(sorted(plan, key=lambda entry: entry[1].objective != "sft"),
                                     desc="variants", unit="variant"):
        run_dir = out_root / name
        point = (variant_config.learning_rate, variant_config.lora_rank)
        try:
            metrics = train_objective(train_path, run_dir, base=base_dir, eval_data=eval_path, replay=replay_path,
                                      preference=preference, config=variant_config, force=force,
                                      sft_run=sft_runs.get(point))
            if variant_config.objective == "sft" and metrics.get("status") == "ok":
                sft_runs[point] = run_dir
        except PreferenceSkipped as exc:  # e.g. every pair's prompt longer than max_length
            metrics = {"status": "skipped", "reason": str(exc)}
        except (DataError, ConfigError, ResumeMismatchError):
            raise  # bad input or a foreign out_root fails every variant alike: say so once
        except Exception as exc:  # noqa: BLE001 - one broken variant must not sink the others
            log.exception("variant %s failed", name)
            metrics = _read_metrics(run_dir) or {}
            metrics.update(status="failed", reason=metrics.get("reason") or f"{type(exc).__name__}: {exc}")
        results.append(VariantResult.from_metrics(name, variant_config, run_dir, metrics))
    return results


def _run_on_gpus(plan, train_path, eval_path, base_dir, out_root: Path, replay_path, force,
                 gpus: int, preference_dir=None) -> list[VariantResult]:
    """One `python -m trainer.train` per GPU at a time, until every variant has run."""
    from trainer.base_model import resolve_base

    base = resolve_base(base_dir)  # convert the bundled model once, before the processes race for it
    pending = list(plan)
    running: dict[int, tuple] = {}  # gpu -> (process, (name, config))
    finished: dict[str, VariantResult] = {}
    progress = tqdm(total=len(plan), desc=f"variants on {gpus} GPUs", unit="variant")
    while pending or running:
        for gpu in range(gpus):
            if gpu not in running and pending:
                entry = pending.pop(0)
                running[gpu] = (_spawn(entry, gpu, train_path, eval_path, base, out_root, replay_path, force,
                                       preference_dir), entry)
        for gpu, (process, (name, variant_config)) in list(running.items()):
            if process.poll() is None:
                continue
            del running[gpu]
            progress.update(1)
            metrics = _read_metrics(out_root / name) or {}
            if process.returncode != 0 and metrics.get("status") not in ("failed", "skipped"):
                metrics.update(status="failed", reason=f"trainer process exited with {process.returncode} "
                                                       f"(log: {out_root / name / 'train.log'})")
            finished[name] = VariantResult.from_metrics(name, variant_config, out_root / name, metrics)
        if running:
            try:
                next(iter(running.values()))[0].wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
    progress.close()
    return [finished[name] for name, _ in plan]


def _spawn(entry, gpu: int, train_path, eval_path, base: str, out_root: Path, replay_path, force,
           preference_dir=None):
    name, variant_config = entry
    run_dir = out_root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "variant_config.toml"  # the child's whole TrainConfig, read by the same loader
    config_path.write_text(toml_table("trainer", variant_config))
    command = [sys.executable, "-m", "trainer.train", "--data", str(train_path), "--output", str(run_dir),
               "--base", base, "--config", str(config_path)]
    if eval_path:
        command += ["--eval", str(eval_path)]
    if replay_path:
        command += ["--replay", str(replay_path)]
    if preference_dir:
        command += ["--preference", str(preference_dir)]
    if force:
        command.append("--force")
    # The environment's LOOP_TRAINER__* overrides are in the file already; over it they would undo the variant's
    # own learning rate, rank or objective.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LOOP_TRAINER__")}
    env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    with open(run_dir / "train.log", "ab") as log_file:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _read_metrics(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def write_report(results: list[VariantResult], out_root: str | Path) -> Path:
    """out_root/variants.json (a row per variant + the chosen one) and out_root/variants.png (all curves)."""
    out_root = Path(out_root)
    best = best_variant(results)
    report = {"best": best.name if best else None, "variants": [r.to_dict(with_metrics=False) for r in results]}
    path = out_root / REPORT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)
    try:
        from trainer.plots import plot_variants

        plot_variants({r.name: r.metrics for r in results}, out_root / "variants.png")
    except Exception as exc:  # noqa: BLE001 - the picture is a convenience
        log.warning("could not draw the variants chart: %s", exc)
    return path
