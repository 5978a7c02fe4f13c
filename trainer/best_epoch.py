"""Early stopping on the judge: score every epoch, keep the adapter of the best one.

How many passes a few dozen corrections need depends on the data (a new fact needs more than a change
of style), and a fixed epoch count is right for one scenario and wrong for the next. So a run trains
``TrainConfig.epochs`` passes and keeps the adapter of the epoch the cycle's judge prefers: the epoch
with the lowest held-out loss (held-out wordings of taught corrections) among the *eligible* ones, those
whose general-ability regression loss is within ``TrainConfig.regression_tolerance`` of the starting
weights' and that kept at least ``TrainConfig.min_general_kept`` of the general answers
(trainer/general_kept.py; the gate's own rules). None eligible: the last epoch stands (the variant then
fails the gate on its own numbers).

The held-out loss is cheap (a few examples, one forward pass) and the forgetting rules are not (32
regression examples, then the general answers, generated where they changed). So every epoch gets its
held-out loss and its LoRA weights saved at its end, and only when training is over are the forgetting
rules checked, epoch by epoch in order of held-out loss, until one passes (``choose``). That keeps the
epoch the rule above defines, every epoch scored in full would keep the same one, and in the usual case
(the last epoch is best and passes) one epoch is checked instead of all of them.

Contract:
  - ``DIR/epoch_adapters/step-<N>.safetensors`` holds each epoch's LoRA weights (written to a temporary
    name and renamed, so a kill never leaves half of one) until the run's adapter is saved
    (``discard_epoch_adapters``); ``DIR/best_epoch.json`` the
    starting weights' losses, every epoch's held-out loss, the forgetting figures of the epochs checked
    (``checked: true``) and the chosen row. A resumed run keeps the rows up to the checkpoint it resumes
    from, forgets later ones, and chooses again at its end; checks already made are reused.
  - A run the divergence guard stopped is not lost when an epoch before the divergence learned: its last,
    diverged weights are never scored or saved, and the best earlier epoch whose held-out loss is below the
    starting weights' and that passes the forgetting rules is kept (``best_epoch.json``'s ``diverged`` says
    where the run stopped and why; ``rescued``). With none, the run fails as diverged.
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

SCORES_FILE = "best_epoch.json"
EPOCH_ADAPTERS = "epoch_adapters"


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


def choose(rows: list[dict], check, start_regression: float | None, tolerance: float,
           min_kept: float = 0.0) -> dict | None:
    """The eligible row with the lowest held-out loss (the earlier on a tie), or None when none is eligible.

    ``check(row)`` fills in a row's ``regression_loss`` and ``general_kept`` and sets ``checked``, or returns
    False when the row's weights cannot be judged (it is then passed over); it is called for rows in order of
    held-out loss, only until one passes the forgetting rules, and never for a row already checked or one
    without a finite held-out loss."""
    ranked = sorted((r for r in rows if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])),
                    key=lambda r: (r["eval_loss"], r["step"]))
    for row in ranked:
        if not row.get("checked") and check(row) is False:
            continue
        if eligible(row, start_regression, tolerance, min_kept):
            return row
    return None


def choose_before_divergence(rows: list[dict], check, start: dict, tolerance: float,
                             min_kept: float = 0.0) -> dict | None:
    """``choose`` among the rows of a run that diverged later, counting only those that learned: a held-out loss
    below the starting weights' (``start["eval_loss"]``; every row when the start has none)."""
    start_eval = start.get("eval_loss")
    learned = [r for r in rows if start_eval is None or (r.get("eval_loss") is not None
                                                         and r["eval_loss"] < start_eval)]
    return choose(learned, check, start.get("regression_loss"), tolerance, min_kept)


def make_callback(output_dir: Path, tokenizer, held_out: list, regression: list, config: TrainConfig, guard=None,
                  weights_dir: str | Path | None = None):
    """A TrainerCallback that scores each epoch and chooses at the end (defined here so importing this module
    stays light). ``guard``: the run's divergence guard; a run it stopped is not judged. ``weights_dir``: where
    the starting weights are (their figures are computed once per weights: trainer/start_cache.py)."""
    from transformers import TrainerCallback

    from trainer.evaluate import eval_loss, start_loss
    from trainer.general_kept import KeptProbe

    output_dir = Path(output_dir)
    weights_dir = output_dir / EPOCH_ADAPTERS

    class BestEpoch(TrainerCallback):
        def __init__(self):
            self.scores = read_scores(output_dir)  # resumed runs carry on from what was judged
            self.kept_probe = None

        def _kept(self, model) -> float | None:
            if self.kept_probe is None:
                self.kept_probe = KeptProbe.for_run(output_dir, model, tokenizer, regression, config.max_length,
                                                    weights_dir)
            return self.kept_probe.share(model, tokenizer)

        def _score(self, model, examples, start: bool = False) -> float | None:
            """The loss of ``model`` on ``examples``; ``start``: of its starting weights (computed once per weights)."""
            if not examples:
                return None
            value = (start_loss(model, examples, tokenizer, config.max_length, config.batch_size, weights_dir) if start
                     else eval_loss(model, examples, tokenizer, config.max_length, config.batch_size))
            return value if math.isfinite(value) else None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero:
                return
            if "start" in self.scores:
                # Resumed from the checkpoint at state.global_step: later epochs will be scored again, and the
                # choice is made again at the end.
                self.scores["epochs"] = [r for r in self.scores["epochs"] if r["step"] <= state.global_step]
                self.scores["best"] = None
                for path in weights_dir.glob("step-*.safetensors"):
                    if _step_of(path) > state.global_step:
                        path.unlink()
                self._save()
                return
            self.scores = {"start": {"eval_loss": self._score(model, held_out, start=True),
                                     "regression_loss": self._score(model, regression, start=True)},
                           "epochs": [], "best": None}
            self._save()

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero or _stopped(guard):
                return  # the Trainer ends a stopped run's epoch too: its weights diverged and are never a candidate
            row = {"epoch": round(state.epoch or 0, 3), "step": state.global_step,
                   "eval_loss": self._score(model, held_out), "regression_loss": None, "general_kept": None,
                   "checked": False}
            _save_weights_atomically(model, weights_dir / f"step-{state.global_step}.safetensors")
            self.scores["epochs"] = [r for r in self.scores["epochs"] if r["step"] != row["step"]] + [row]
            log.info("epoch %s: held-out %s", row["epoch"], row["eval_loss"])
            self._save()

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero:
                return
            epochs = self.scores.get("epochs") or []
            if not epochs:
                return
            last, final = epochs[-1], state.global_step
            stopped = _stopped(guard)
            if not stopped and not (weights_dir / f"step-{final}.safetensors").is_file():
                _save_weights_atomically(model, weights_dir / f"step-{final}.safetensors")
            loaded = {"step": final}  # whose weights the model holds

            def check(row: dict) -> bool:
                if loaded["step"] != row["step"]:
                    path = weights_dir / f"step-{row['step']}.safetensors"
                    if not path.is_file():  # its weights are gone (a resumed run's cleanup): it cannot be kept
                        log.warning("epoch %s has no saved weights at %s; it cannot be kept", row["epoch"], path)
                        return False
                    _load_weights(model, path)
                    loaded["step"] = row["step"]
                row.update(regression_loss=self._score(model, regression), general_kept=self._kept(model),
                           checked=True)
                log.info("epoch %s checked: regression %s, general kept %s", row["epoch"], row["regression_loss"],
                         row["general_kept"])
                self._save()
                return True

            if stopped:
                self._rescue(epochs, check, final)
                return
            best = choose(epochs, check, self.scores["start"].get("regression_loss"), config.regression_tolerance,
                          config.min_general_kept)
            if best is None and last["step"] == final and not last.get("checked"):
                check(last)  # none eligible: the last epoch stands, reported with its own figures
            self.scores["best"] = best
            if loaded["step"] != final:
                # The model leaves training with its final weights; restore_best loads the chosen epoch's.
                _load_weights(model, weights_dir / f"step-{final}.safetensors")
            log.info("epoch kept: %s", (best or last)["epoch"])
            self._save()

        def _rescue(self, epochs, check, final):
            """The guard stopped the run: keep the best epoch judged before it, if one learned (a held-out loss
            below the starting weights') within the forgetting rules. The model's weights are left as they are:
            restore_best loads the kept epoch's."""
            best = choose_before_divergence(epochs, check, self.scores["start"], config.regression_tolerance,
                                            config.min_general_kept)
            self.scores["best"] = best
            self.scores["diverged"] = {"step": final, "reason": guard.reason}
            log.warning("the run diverged at step %s (%s); %s", final, guard.reason,
                        f"epoch {best['epoch']} kept, judged before it" if best else "no epoch before it can be kept")
            self._save()

        def _save(self):
            output_dir.mkdir(parents=True, exist_ok=True)
            tmp = output_dir / (SCORES_FILE + ".tmp")
            tmp.write_text(json.dumps(self.scores, indent=2))
            os.replace(tmp, output_dir / SCORES_FILE)

    return BestEpoch()


def _stopped(guard) -> bool:
    return guard is not None and guard.reason is not None


def _step_of(path: Path) -> int:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _save_weights_atomically(model, target: Path) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(tmp))
    os.replace(tmp, target)


def _load_weights(model, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path), device=str(next(model.parameters()).device)))


def discard_epoch_adapters(output_dir: Path) -> None:
    """Remove the per-epoch weights once the run's adapter (the chosen epoch's) is saved."""
    shutil.rmtree(Path(output_dir) / EPOCH_ADAPTERS, ignore_errors=True)


def rescued(output_dir: Path) -> dict | None:
    """The epoch kept from a run the divergence guard stopped (see ``_rescue``), None when there is none."""
    scores = read_scores(output_dir)
    return scores.get("best") if scores.get("diverged") else None


def restore_best(model, output_dir: Path) -> dict | None:
    """Load the chosen epoch's LoRA weights into ``model`` when an earlier epoch beat the last, or the run diverged
    after it; its score row."""
    scores = read_scores(output_dir)
    best, epochs = scores.get("best"), scores.get("epochs") or []
    if not best or not epochs or (best["step"] == epochs[-1]["step"] and not scores.get("diverged")):
        return None
    weights = Path(output_dir) / EPOCH_ADAPTERS / f"step-{best['step']}.safetensors"
    if not weights.is_file():
        log.warning("best epoch %s has no saved weights at %s; keeping the last epoch", best["epoch"], weights)
        return None
    _load_weights(model, weights)
    return best
