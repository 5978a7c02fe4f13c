"""Kill -9 a real training process after a checkpoint, run it again: it resumes and ends as an unkilled run.

Also: a torn checkpoint (killed mid-write) is skipped, and the resume contract refuses a different run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loop.core.config import toml_table
from trainer.config import TrainConfig
from trainer.data import write_examples
from trainer.resume import (
    PROGRESS_FILE,
    TORN_DIR,
    ResumeMismatchError,
    TrainingProgress,
    check_or_start,
    checkpoint_problem,
    newest_complete_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 8, 2


def examples(n: int) -> list[dict]:
    return [{"id": f"e{i}", "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": f"What is code {i}?"},
                                         {"role": "assistant", "content": f"Code {i} is {i * 37 % 101}."}]}
            for i in range(n)]


def config(tmp_path: Path) -> TrainConfig:
    regression = tmp_path / "regression.jsonl"
    write_examples(regression, examples(1))
    return TrainConfig(max_steps=STEPS, save_steps=SAVE_EVERY, batch_size=2, max_length=64, lora_rank=4,
                       learning_rate=1e-3, min_examples=4, regression_set=str(regression))


def command(data: Path, eval_data: Path, run: Path, base: Path, config_file: Path) -> list[str]:
    return [sys.executable, "-m", "trainer.train", "--data", str(data), "--eval", str(eval_data), "--output",
            str(run), "--base", str(base), "--config", str(config_file)]


def wait_for_checkpoint(process: subprocess.Popen, run: Path, step: int, timeout: float = 600) -> None:
    state = run / f"checkpoint-{step}" / "trainer_state.json"
    deadline = time.time() + timeout
    while not state.exists():
        assert process.poll() is None, f"training exited early with {process.returncode}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_run(base_hf_dir, tmp_path):
    from trainer.train import train

    data, eval_data = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_examples(data, examples(8))
    write_examples(eval_data, examples(10)[8:])
    cfg = config(tmp_path)
    config_file = tmp_path / "config.toml"
    config_file.write_text(toml_table("trainer", cfg))

    # The uninterrupted reference, in this process (same seeds, same code path).
    reference = train(data, tmp_path / "reference", base=base_hf_dir, eval_data=eval_data, config=cfg)
    assert reference["status"] == "ok"

    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(command(data, eval_data, run, base_hf_dir, config_file), cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_checkpoint(process, run, 2 * SAVE_EVERY)
        # Let the trainer_state.json write finish (it is the checkpoint's last file), then kill it hard.
        time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (run / "metrics.json").exists() and not (run / "adapter").exists()

    assert not (run / f"checkpoint-{3 * SAVE_EVERY}" / "trainer_state.json").exists(), "killed too late"

    # Tear the newest checkpoint the way a kill during its write would: a short optimizer file.
    newest = run / f"checkpoint-{2 * SAVE_EVERY}"
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    older = SAVE_EVERY

    rerun = subprocess.run(command(data, eval_data, run, base_hf_dir, config_file), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "skipping torn checkpoint" in rerun.stderr
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["status"] == "ok"
    assert resumed["resumed_from"] == f"checkpoint-{older}"
    assert (run / TORN_DIR).is_dir() and not newest.exists()

    # Every step after the resume point was trained once (not twice), and matches the unkilled run.
    steps = [step for step, _ in resumed["train_loss_curve"]]
    assert steps == list(range(1, STEPS + 1))
    expected = dict(map(tuple, reference["train_loss_curve"]))
    for step, loss in resumed["train_loss_curve"]:
        assert loss == pytest.approx(expected[step], rel=1e-3, abs=1e-4), f"step {step}"
    assert resumed["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-3)


def test_torn_checkpoints_are_skipped_not_fatal(tmp_path):
    """Checkpoints missing their last file or with an unreadable adapter are moved aside; the rest is used."""
    import torch
    from safetensors.torch import save_file

    run = tmp_path / "run"

    def checkpoint(step: int) -> Path:
        path = run / f"checkpoint-{step}"
        path.mkdir(parents=True)
        save_file({"lora_A": torch.zeros(2, 2)}, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text("{}")
        torch.save({"state": {}}, path / "optimizer.pt")
        torch.save({}, path / "scheduler.pt")
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        return path

    checkpoint(2)
    (checkpoint(4) / "trainer_state.json").unlink()  # killed before the last file
    adapter = checkpoint(6) / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:20])  # killed halfway through the weights
    assert checkpoint_problem(run / "checkpoint-2") is None
    assert "trainer_state.json" in checkpoint_problem(run / "checkpoint-4")
    assert "adapter" in checkpoint_problem(run / "checkpoint-6")
    assert newest_complete_checkpoint(run) == run / "checkpoint-2"
    assert sorted(p.name.rsplit("-", 1)[0] for p in (run / TORN_DIR).iterdir()) == ["checkpoint-4", "checkpoint-6"]
    shutil.rmtree(run / "checkpoint-2")
    assert newest_complete_checkpoint(run) is None  # nothing usable: start from scratch, no error


def test_resume_contract_mismatch_is_an_error_unless_forced(tmp_path):
    run = tmp_path / "run"
    base = {"base": "/models/a", "fingerprint": "x"}
    first = TrainingProgress(config=TrainConfig().resume_fields(), data_hash="d1", eval_hash="e1", base=base)
    assert check_or_start(run, first, force=False) is False  # fresh: contract written
    assert check_or_start(run, first, force=False) is True  # same run: resume
    (run / "checkpoint-5").mkdir()
    (run / "general_kept.json").write_text("{}")  # the old base's answers: another base answers otherwise

    other = TrainingProgress(config=TrainConfig(learning_rate=5e-5, lora_rank=64).resume_fields(),
                             data_hash="d2", eval_hash="e1", base={"base": "/models/b", "fingerprint": "y"})
    with pytest.raises(ResumeMismatchError) as info:
        check_or_start(run, other, force=False)
    message = str(info.value)
    for fragment in ("learning_rate", "lora_rank", "lora_alpha", "training data", "base model", "--force"):
        assert fragment in message, fragment
    assert (run / "checkpoint-5").exists()  # nothing was touched

    assert check_or_start(run, other, force=True) is False  # forced: the old run is discarded
    assert not (run / "checkpoint-5").exists() and not (run / "general_kept.json").exists()
    assert TrainingProgress.load(run) == other

    foreign = tmp_path / "foreign"
    (foreign / "checkpoint-3").mkdir(parents=True)  # checkpoints without a contract cannot be trusted
    with pytest.raises(ResumeMismatchError, match=PROGRESS_FILE):
        check_or_start(foreign, first, force=False)


def test_resuming_with_another_number_of_processes_is_a_mismatch(tmp_path):
    run = tmp_path / "run"
    base = {"base": "/models/a", "fingerprint": "x"}
    one = TrainingProgress(config=TrainConfig().resume_fields(), data_hash="d", eval_hash="e", base=base)
    assert check_or_start(run, one, force=False) is False
    (run / "checkpoint-2").mkdir()
    two = TrainingProgress(config=TrainConfig().resume_fields(), data_hash="d", eval_hash="e", base=base,
                           world_size=2)
    with pytest.raises(ResumeMismatchError, match="processes: stored 1, now 2"):
        check_or_start(run, two, force=False)


def test_base_weights_changed_in_place_with_the_same_size_change_the_fingerprint(tmp_path):
    from trainer.base_model import base_identity

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    weights = base / "model.safetensors"
    weights.write_bytes(bytes(1 << 20))
    before = base_identity(str(base))["fingerprint"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] = 1  # retrained values, same shape and size
    weights.write_bytes(bytes(data))
    assert base_identity(str(base))["fingerprint"] != before
