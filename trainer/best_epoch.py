"""Early stopping on the judge: score every epoch, keep the adapter of the best one.

How many passes a few dozen corrections need depends on the data (a new fact needs more than a change
of style), and a fixed epoch count is right for one scenario and wrong for the next. So a run trains
``TrainConfig.epochs`` passes and, at the end of every epoch, scores the adapter on the cycle's judge:
the held-out loss (held-out wordings of taught corrections), the general-ability regression loss and the
share of general answers kept (trainer/general_kept.py). An epoch is *eligible* when its regression loss
is within ``TrainConfig.regression_tolerance`` of the starting weights' and it kept at least
``TrainConfig.min_general_kept`` of the general answers (the gate's own rules); the eligible epoch with the
lowest held-out loss is kept. None eligible: the last epoch stands (the variant then fails the gate on its
own numbers).

Contract:
  - ``DIR/best_epoch/`` holds the best adapter so far (written to a temporary sibling and renamed, so a
    kill never leaves half of one) and ``DIR/best_epoch.json`` the score of every epoch so far; a
    resumed run keeps the judgements up to the checkpoint it resumes from and forgets later ones.
  - With no held-out examples, or ``select_best_epoch = False``, nothing is scored and nothing changes.
  - Only the main process scores and writes (data-parallel runs hold identical weights).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

from trainer.config import TrainConfig

log = logging.getLogger(__name__)

BEST_DIR = "best_epoch"
SCORES_FILE = "best_epoch.json"


def read_scores(output_dir: Path) -> dict:
    path = Path(output_dir) / SCORES_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def eligible(row: dict, start_regression: float | None, tolerance: float, min_kept: float = 0.0) -> bool:
    """A scored row the judge may keep: a finite held-out loss and within the forgetting rules."""
    if row.get("eval_loss") is None or not math.isfinite(row["eval_loss"]):
        return False
    return forgetting(row, start_regression, tolerance, min_kept) is None


def forgetting(row: dict, start_regression: float | None, tolerance: float, min_kept: float = 0.0) -> str | None:
    """Why a scored row breaks the gate's forgetting rules, None when it keeps them: fewer than ``min_kept`` of
    the general answers kept, or a regression loss beyond ``tolerance`` of the starting weights' (a row or a
    start without one is judged on the general answers alone)."""
    kept, now = row.get("general_kept"), row.get("regression_loss")
    if kept is not None and kept < min_kept:
        return f"kept {kept:.0%} of the general answers, below {min_kept:.0%}"
    if start_regression is None or now is None:
        return None
    if not math.isfinite(now):
        return f"no finite regression loss ({now})"
    if now > start_regression * (1.0 + tolerance):
        return (f"regression loss {now:.4f} is {(now - start_regression) / start_regression:+.1%} from the start, "
                f"beyond +{tolerance:.0%}")
    return None


def make_callback(output_dir: Path, tokenizer, held_out: list, regression: list, config: TrainConfig):
    """A TrainerCallback that scores each epoch (defined here so importing this module stays light)."""
    from transformers import TrainerCallback

    from trainer.evaluate import eval_loss
    from trainer.general_kept import KeptProbe

    output_dir = Path(output_dir)

    class BestEpoch(TrainerCallback):
        def __init__(self):
            self.scores = read_scores(output_dir)  # resumed runs carry on from what was judged
            self.kept_probe = None

        def _kept(self, model) -> float | None:
            if self.kept_probe is None:
                self.kept_probe = KeptProbe.for_run(output_dir, model, tokenizer, regression, config.max_length)
            return self.kept_probe.share(model, tokenizer)

        def _score(self, model, examples, **kw) -> float | None:
            if not examples:
                return None
            value = eval_loss(model, examples, tokenizer, config.max_length, config.batch_size, **kw)
            return value if math.isfinite(value) else None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero:
                return
            if "start" in self.scores:
                # Resumed from the checkpoint at state.global_step: later judgements will be made again, and
                # a best adapter from beyond that step no longer matches any weights this run will have.
                self.scores["epochs"] = [r for r in self.scores["epochs"] if r["step"] <= state.global_step]
                if (self.scores.get("best") or {}).get("step", 0) > state.global_step:
                    self.scores["best"] = None
                    shutil.rmtree(output_dir / BEST_DIR, ignore_errors=True)
                self._save()
                return
            self.scores = {"start": {"eval_loss": self._score(model, held_out, disable_adapter=True),
                                     "regression_loss": self._score(model, regression, disable_adapter=True)},
                           "epochs": [], "best": None}
            self._save()

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero:
                return
            row = {"epoch": round(state.epoch or 0, 3), "step": state.global_step,
                   "eval_loss": self._score(model, held_out), "regression_loss": self._score(model, regression),
                   "general_kept": self._kept(model)}
            self.scores["epochs"].append(row)
            start = self.scores["start"].get("regression_loss")
            best = self.scores.get("best")
            if eligible(row, start, config.regression_tolerance, config.min_general_kept) and (
                    best is None or row["eval_loss"] < best["eval_loss"]):
                _save_adapter_atomically(model, output_dir / BEST_DIR)
                self.scores["best"] = row
            log.info("epoch %s: held-out %s, regression %s, general kept %s (best: epoch %s)", row["epoch"],
                     row["eval_loss"], row["regression_loss"], row["general_kept"],
                     (self.scores.get("best") or {}).get("epoch"))
            self._save()

        def _save(self):
            output_dir.mkdir(parents=True, exist_ok=True)
            tmp = output_dir / (SCORES_FILE + ".tmp")
            tmp.write_text(json.dumps(self.scores, indent=2))
            os.replace(tmp, output_dir / SCORES_FILE)

    return BestEpoch()


def _save_adapter_atomically(model, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    old = target.with_name(target.name + ".old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def restore_best(model, output_dir: Path) -> dict | None:
    """Load the best epoch's LoRA weights into ``model`` when an earlier epoch beat the last; its score row."""
    scores = read_scores(output_dir)
    best, epochs = scores.get("best"), scores.get("epochs") or []
    if not best or not epochs or best["step"] == epochs[-1]["step"]:
        return None
    weights = Path(output_dir) / BEST_DIR / "adapter_model.safetensors"
    if not weights.is_file():
        log.warning("best epoch %s has no saved adapter at %s; keeping the last epoch", best["epoch"], weights)
        return None
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(weights), device=str(next(model.parameters()).device)))
    return best
