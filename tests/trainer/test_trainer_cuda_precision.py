"""cuda_precision = "fp32": a GPU run with the CPU path's arithmetic and batches (tuning sweeps rely on it).

No GPU here: these check the arguments the trainer builds for a CUDA run, which is where the three precisions
differ; the GPU sweep in benchmarks/RESULTS.md ran them for real.
"""

from dataclasses import replace
from pathlib import Path

import pytest

from trainer.config import TrainConfig
from trainer.sft_trainer import trainer_args


def test_fp32_on_cuda_trains_in_float32_not_bf16(tmp_path: Path):
    args = trainer_args(replace(TrainConfig(), cuda_precision="fp32"), tmp_path, cuda=True)
    assert args["bf16"] is False and args["use_cpu"] is False


@pytest.mark.parametrize("precision", ["qlora", "bf16"])
def test_the_other_cuda_precisions_keep_bf16(tmp_path: Path, precision: str):
    assert trainer_args(replace(TrainConfig(), cuda_precision=precision), tmp_path, cuda=True)["bf16"] is True


@pytest.mark.parametrize(("precision", "fast_path_calls"), [("fp32", 0), ("bf16", 1), ("qlora", 1)])
def test_only_fp32_on_cuda_skips_the_fast_path(monkeypatch, tmp_path: Path, precision: str, fast_path_calls: int):
    import trainer.sft_trainer as sft

    calls = []
    monkeypatch.setattr(sft, "_apply_cuda_fast", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(sft, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(sft, "run_callbacks", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(RuntimeError, match="stop"):
        sft.build_trainer("base", None, [], [], tmp_path, replace(TrainConfig(), cuda_precision=precision))
    assert len(calls) == fast_path_calls


def test_an_unknown_cuda_precision_is_a_config_problem():
    assert any("cuda_precision" in p for p in replace(TrainConfig(), cuda_precision="fp8").validate())
