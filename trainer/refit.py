"""Refit: the chosen variant trained once more on every curated example, its held-out wordings included.

The judge holds out one wording of every taught correction (annotation/judge_split.py) so that the variant
choice and the gate's held-out loss measure generalisation to words the model never saw. The model that
answers users need not go without those wordings: once the judge has chosen, the chosen variant's adapter
is trained further on the training set *plus* the held-out examples, and that adapter is the one exported.
This is model selection followed by a refit on all the data (scikit-learn's ``GridSearchCV(refit=True)``),
continued from the chosen weights instead of started again. At ~10 corrections a third more wordings per fact is a large
lever: on the scenario suite, recall of facts asked in new words rose from 0.84 to 0.91 on the tuning
scenarios and from 0.66 to 0.82 on the unseen ones (benchmarks/RESULTS.md, "Learning: refit on every wording").

Contract: ``refit_variant(best, train_path, eval_path, base_dir, out_dir, config)`` -> a ``Refit``.
  - It runs only for an ``sft`` variant with held-out examples (else ``skipped``, with the reason): the
    preference objectives are served as judged.
  - The refit continues the judged adapter (``init_adapter``: its chosen epoch's weights, a fresh optimizer) at
    the variant's learning rate times ``config.refit_learning_rate_factor`` for ``config.refit_epochs`` passes:
    three passes from there recalled and kept what six from the starting weights did, in about 40% of the steps
    (docs/trainer.md, "The refit continues"). ``refit_epochs = 0`` retrains the variant's learning rate and rank
    from the starting weights for ``config.epochs`` passes. A judged variant without its adapter is ``skipped``.
    Either way it trains in ``out_dir`` (an ordinary run directory: a killed cycle resumes it) and is judged once,
    on its final weights, not at every epoch (``select_best_epoch`` off): an epoch judge would score held-out
    examples the refit trains on, which cannot measure generalisation and only falls, so all it could do is keep
    the last epoch that passed the forgetting rules, and the last epoch passed them in 24 of 24 suite runs
    (benchmarks/RESULTS.md, "Judging cost"). The per-epoch judging was about a fifth of the refit's time on 2
    cores. The starting model's general answers are the judged variant's (the same starting weights answer the
    same prompts): its ``general_kept.json`` is copied, not generated again.
  - It is ``used`` only when it succeeded and passes the gate's forgetting rules on its final weights
    (regression loss within ``config.regression_tolerance`` of the starting weights' and at least
    ``config.min_general_kept`` of the general answers kept). Otherwise it is ``refused`` (or ``failed``: an
    error or a diverged run) with the reason, and the judged variant's adapter is served instead; a refit
    never stops a cycle.
  - Its held-out loss would be measured on examples it trained on, so the gate keeps the judged variant's
    held-out loss (the honest estimate of generalisation) and takes the refit's regression loss and general
    answers kept (they are the served weights' own).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trainer.config import TrainConfig

log = logging.getLogger(__name__)

USED, SKIPPED, REFUSED, FAILED = "used", "skipped", "refused", "failed"


@dataclass
class Refit:
    status: str  # USED, SKIPPED, REFUSED or FAILED
    reason: str | None = None
    run_dir: str | None = None
    adapter_dir: str | None = None  # set only when USED: the adapter to export
    examples: int | None = None  # training examples of the refit (the variant's plus the held-out ones)
    regression_loss: float | None = None
    regression_loss_start: float | None = None
    general_kept: float | None = None
    wall_time_s: float | None = None
    metrics: dict = field(default_factory=dict)

    def to_dict(self, with_metrics: bool = False) -> dict:
        row = asdict(self)
        if not with_metrics:
            row.pop("metrics")
        return row


def refit_variant(best, train_path: str | Path, eval_path: str | Path | None, base_dir, out_dir: str | Path,
                  config: TrainConfig) -> Refit:
    """Train `best` (a trainer.variants.VariantResult) again on train + held-out examples; see the module doc."""
    from trainer.run_report import adapter_subdir
    from trainer.train import examples_of, train

    if not config.refit:
        return Refit(SKIPPED, "trainer.refit is off")
    if best.objective != "sft":
        return Refit(SKIPPED, f"objective {best.objective}: only sft variants are refit")
    held_out = examples_of(eval_path)
    if not held_out:
        return Refit(SKIPPED, "no held-out examples to add")
    data = examples_of(train_path) + held_out
    run_config = replace(config, learning_rate=best.learning_rate * config.refit_learning_rate_factor,
                         lora_rank=best.lora_rank, objective="sft", select_best_epoch=False)
    if config.refit_epochs > 0:  # continue the judged adapter; 0 retrains from the starting weights
        if best.adapter_dir is None or not Path(best.adapter_dir).is_dir():
            return Refit(SKIPPED, f"the judged adapter of {best.name} is missing: nothing to continue")
        run_config = replace(run_config, epochs=config.refit_epochs, init_adapter=str(best.adapter_dir))
    out_dir = Path(out_dir)
    _reuse_start_answers(best, out_dir)
    try:
        metrics = train(data, out_dir, base=base_dir, eval_data=held_out, config=run_config)
    except Exception as exc:  # noqa: BLE001 - the judged variant is still there to serve
        log.exception("refit of %s failed", best.name)
        return Refit(FAILED, f"{type(exc).__name__}: {exc}", run_dir=str(out_dir))
    result = Refit(FAILED, metrics.get("reason"), run_dir=str(out_dir), examples=len(data),
                   regression_loss=metrics.get("regression_loss"),
                   regression_loss_start=metrics.get("regression_loss_start"),
                   general_kept=metrics.get("general_kept"), wall_time_s=metrics.get("wall_time_s"), metrics=metrics)
    if metrics.get("status") != "ok":
        return result
    why = _forgets(result, config)
    if why:
        result.status, result.reason = REFUSED, why
        log.warning("refit of %s refused (%s): the judged adapter is served", best.name, why)
        return result
    result.status, result.reason = USED, None
    result.adapter_dir = str(out_dir / adapter_subdir(metrics))
    return result


def _forgets(refit: Refit, config: TrainConfig) -> str | None:
    """Why the gate's forgetting rules refuse the refit's final weights; None when they pass."""
    from trainer.best_epoch import forgetting

    if refit.regression_loss is None or not math.isfinite(refit.regression_loss):
        return "no finite regression loss"
    return forgetting({"regression_loss": refit.regression_loss, "general_kept": refit.general_kept},
                      refit.regression_loss_start, config.regression_tolerance, config.min_general_kept)


def _reuse_start_answers(best, out_dir: Path) -> None:
    """Give the refit the judged run's general-answers probe (the same starting weights' greedy answers)."""
    from trainer.general_kept import PROBE_FILE

    source = Path(best.run_dir) / PROBE_FILE if best.run_dir else None
    if source is None or not source.is_file() or (out_dir / PROBE_FILE).exists():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (PROBE_FILE + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, out_dir / PROBE_FILE)
