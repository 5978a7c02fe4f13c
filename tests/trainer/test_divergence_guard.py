"""The divergence guard: non-finite and chance-level losses stop a run at once; a loss that stays exploded stops it
within the window; a single hard batch does not."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from trainer.config import TrainConfig
from trainer.sft_trainer import run_callbacks

VOCAB = 49152  # SmolLM2's: chance level is ln(49152) = 10.8 nats


def guard_for(config: TrainConfig | None = None):
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB))
    return run_callbacks(model, config or TrainConfig())[0]


def feed(guard, losses, state: TrainerState | None = None, grad_norm: float = 1.0):
    """Log `losses` one step each, as the Trainer does with logging_steps=1; the control after each step."""
    state = state or TrainerState()
    controls = []
    guard.on_train_begin(None, state, TrainerControl())
    for loss in losses:
        state.global_step += 1
        logs = {"loss": loss, "grad_norm": grad_norm}
        state.log_history.append({**logs, "step": state.global_step})
        control = TrainerControl()
        guard.on_log(None, state, control, logs=logs)
        controls.append(control)
    return controls


def stopped_at(controls) -> int | None:
    return next((i + 1 for i, c in enumerate(controls) if c.should_training_stop), None)


def test_one_hard_batch_far_above_the_limit_does_not_stop_a_run():
    # What stopped a good refit at batch 2: loss near 1 nat, one batch of two examples at 5.3 nats.
    guard = guard_for()
    controls = feed(guard, [1.05, 0.9, 0.7, 0.6, 5.34, 0.5, 0.45, 0.4])
    assert stopped_at(controls) is None and guard.reason is None


def test_two_hard_batches_in_a_window_of_five_do_not_stop_a_run():
    guard = guard_for()
    assert stopped_at(feed(guard, [1.0, 0.8, 6.0, 0.7, 7.0, 0.6, 0.5])) is None


def test_a_loss_that_stays_exploded_stops_the_run_once_most_of_the_window_is_over_the_limit():
    guard = guard_for()
    controls = feed(guard, [1.0, 0.8, 0.7, 6.0, 6.5, 7.0, 7.2, 7.5])
    assert stopped_at(controls) == 6  # three of the last five above 5 x 1.0
    stop = controls[5]
    assert not stop.should_save and not stop.should_evaluate
    assert "exploded" in guard.reason and "step 6" in guard.reason and "7" in guard.reason


def test_a_window_of_one_stops_on_the_first_loss_over_the_limit():
    guard = guard_for(TrainConfig(loss_explode_window=1))
    assert stopped_at(feed(guard, [1.0, 0.8, 5.34, 0.5])) == 3


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_stops_the_run_at_its_step(bad):
    guard = guard_for()
    assert stopped_at(feed(guard, [1.0, 0.9, bad])) == 3
    assert f"loss became {bad}" in guard.reason


def test_a_non_finite_gradient_norm_stops_the_run_at_its_step():
    guard = guard_for()
    assert stopped_at(feed(guard, [1.0], grad_norm=math.nan)) == 1
    assert "gradient norm" in guard.reason


def test_a_loss_at_chance_level_stops_the_run_at_its_step():
    guard = guard_for()
    assert stopped_at(feed(guard, [1.0, 0.9, 10.5])) == 3
    assert "guessing uniformly" in guard.reason


def test_the_reference_is_floored_at_one_nat_so_an_easy_first_batch_does_not_lower_the_limit():
    guard = guard_for()
    # 5 x 0.3 would be 1.5; losses near 2 are an ordinary run, not an explosion.
    assert stopped_at(feed(guard, [0.3, 2.0, 2.2, 2.1, 1.9, 2.0])) is None


def test_a_resumed_run_keeps_the_first_loss_and_the_window_of_the_run_before_the_restart():
    state = TrainerState()
    feed(guard_for(), [1.0, 0.8, 6.0, 6.5], state=state)  # killed here: two high losses in the window
    resumed = guard_for()
    controls = feed(resumed, [7.0], state=state)
    assert stopped_at(controls) == 1 and "step 5" in resumed.reason


def test_a_resumed_run_does_not_stop_on_its_first_hard_batch_after_a_quiet_window():
    state = TrainerState()
    feed(guard_for(), [1.0, 0.8, 0.7, 0.6], state=state)  # killed here: nothing high in the window
    resumed = guard_for()
    assert stopped_at(feed(resumed, [7.0, 0.5], state=state)) is None and resumed.reason is None


def test_the_window_must_be_a_whole_number_of_at_least_one():
    assert not any("loss_explode_window" in p for p in TrainConfig().validate())
    for bad in (0, -1, 2.5, True):
        assert any("loss_explode_window" in p for p in TrainConfig(loss_explode_window=bad).validate()), bad
