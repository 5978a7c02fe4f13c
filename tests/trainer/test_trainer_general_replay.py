"""The general-ability replay set is shipped, well-formed, and never overlaps the regression set it protects."""

from trainer.config import TrainConfig
from trainer.data import build_training_set
from trainer.evaluate import load_general_replay, load_regression_set


def _questions(examples):
    return {ex["messages"][0]["content"].strip().lower() for ex in examples}


def test_replay_set_is_disjoint_from_the_regression_set():
    replay = load_general_replay(TrainConfig())
    regression = load_regression_set(TrainConfig())
    assert len(replay) >= 20
    assert all(ex["messages"][-1]["role"] == "assistant" and ex["id"].startswith("general-") for ex in replay)
    assert not _questions(replay) & _questions(regression)  # otherwise the gate would measure training data


def test_replay_can_be_switched_off_and_mixes_by_ratio():
    assert load_general_replay(TrainConfig(general_replay="off")) == []
    new = [{"id": f"new-{i}", "messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}]}
           for i in range(10)]
    mixed = build_training_set(new, load_general_replay(TrainConfig()), 0.5, seed=1)
    assert sum(ex["id"].startswith("general-") for ex in mixed) == 10
    assert {ex["id"] for ex in new} <= {ex["id"] for ex in mixed}
