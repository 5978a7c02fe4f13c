"""Data-parallel training: two processes (torch.distributed, gloo on the CPU) train one run together.

`accelerate launch -m trainer.train ...` starts the same processes on GPUs; on a CPU torchrun is the launcher
that starts several. Only the main process writes the contract, the adapter and the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.data import write_examples

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_processes_train_one_run(base_hf_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    write_examples(data, [{"id": f"p{i}", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is code {i}?"},
        {"role": "assistant", "content": f"Code {i} is {i * 13 % 29}."}]} for i in range(8)])
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "trainer.train", "--data", str(data), "--eval", str(data), "--output", str(run),
               "--base", str(base_hf_dir), "--set", "trainer.max_steps=2", "--set", "trainer.save_steps=2",
               "--set", "trainer.batch_size=2", "--set", "trainer.max_length=64", "--set", "trainer.min_examples=4"]
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["world_size"] == 2 and metrics["steps"] == 2
    # 2 steps x 2 processes x 2 examples = all 8 examples once: the processes split the data between them.
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["epoch"] == 1.0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not list(run.glob("*.tmp"))
