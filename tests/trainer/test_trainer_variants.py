"""The variant grid: one directory and one metrics.json per variant; a diverging variant fails and is never chosen."""

from __future__ import annotations

import json

import pytest

from trainer.config import TrainConfig, VariantGrid
from trainer.data import write_examples
from trainer.variants import REPORT_FILE, VariantResult, best_variant, run_variants


def examples(n: int, offset: int = 0) -> list[dict]:
    return [{"id": f"v{i}", "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": f"What is the code word {i}?"},
                                         {"role": "assistant", "content": f"The code word {i} is amber-{i * 7}."}]}
            for i in range(offset, offset + n)]


@pytest.mark.slow
def test_grid_gives_distinct_runs_and_a_diverging_variant_is_failed(base_hf_dir, tmp_path):
    train_path, eval_path, regression = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "reg.jsonl"
    write_examples(train_path, examples(4))
    write_examples(eval_path, examples(4))  # the same facts: learnable, so a working variant improves
    write_examples(regression, examples(1, offset=50))
    config = TrainConfig(max_steps=3, save_steps=3, batch_size=2, max_length=64, min_examples=4,
                         regression_set=str(regression))
    # lr 1e9 makes AdamW move every weight by ~1e9 at the first step: the loss explodes or turns NaN.
    grid = VariantGrid(learning_rates=[1e-3, 1e9], ranks=[4, 8])
    out = tmp_path / "variants"
    results = run_variants(train_path, eval_path, base_hf_dir, out, grid, config)

    assert [r.name for r in results] == ["lr0.001_r4", "lr0.001_r8", "lr1e+09_r4", "lr1e+09_r8"]
    by_name = {r.name: r for r in results}
    for name in ("lr0.001_r4", "lr0.001_r8"):
        good = by_name[name]
        assert good.status == "ok", good.reason
        assert good.eval_loss < good.eval_loss_start and good.regression_loss is not None
        assert good.tokens_per_s > 0 and good.wall_time_s > 0 and good.peak_memory_mb["rss"] > 0
        assert (good.run_dir / "loss_curve.png").is_file() and (good.adapter_dir / "adapter_config.json").is_file()
        assert json.loads((good.run_dir / "adapter" / "adapter_config.json").read_text())["r"] == good.lora_rank
        assert good.metrics["config"]["learning_rate"] == 1e-3 and good.metrics["steps"] == 3
    assert by_name["lr0.001_r4"].eval_loss != by_name["lr0.001_r8"].eval_loss  # distinct runs, distinct results
    for name in ("lr1e+09_r4", "lr1e+09_r8"):
        bad = by_name[name]
        assert bad.status == "failed" and bad.adapter_dir is None
        assert "loss" in bad.reason and bad.metrics["failure"] == "diverged", bad.reason
        assert bad.metrics["steps"] < 3  # stopped early

    best = best_variant(results)
    assert best is not None and best.status == "ok"
    assert best.eval_loss == min(r.eval_loss for r in results if r.status == "ok")
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["best"] == best.name and len(report["variants"]) == 4
    assert (out / "variants.png").read_bytes()[:4] == b"\x89PNG"
    assert {r["name"]: r["status"] for r in report["variants"]}["lr1e+09_r8"] == "failed"

    # Run again (a resumed cycle): finished and failed variants alike are not trained again.
    again = run_variants(train_path, eval_path, base_hf_dir, out, grid, config)
    assert [(r.name, r.status, r.eval_loss) for r in again] == [(r.name, r.status, r.eval_loss) for r in results]


def test_failed_variant_is_never_best_whatever_its_numbers():
    def result(name, status, eval_loss, regression=1.0):
        return VariantResult(name=name, learning_rate=1e-3, lora_rank=8, lora_alpha=16, run_dir=None,
                             status=status, eval_loss=eval_loss, regression_loss=regression,
                             regression_loss_start=1.0)

    failed = result("diverged", "failed", 0.001)
    assert best_variant([failed]) is None
    assert best_variant([]) is None
    assert best_variant([failed, result("a", "ok", 0.9), result("b", "ok", 0.5)]).name == "b"
    assert best_variant([result("a", "ok", 0.5, 2.0), result("b", "ok", 0.5, 1.0)]).name == "b"  # tie: less forgetting
    assert best_variant([result("nan", "ok", float("nan")), result("a", "ok", 3.0)]).name == "a"
    forgetful, careful = result("forgetful", "ok", 0.4, 1.2), result("careful", "ok", 0.6, 1.02)
    assert best_variant([forgetful, careful]).name == "forgetful"  # held-out loss alone
    assert best_variant([forgetful, careful], regression_tolerance=0.05).name == "careful"
    assert best_variant([forgetful], regression_tolerance=0.05) is None
    # A variant that lost general answers (trainer/general_kept.py) is left out like one that forgot by loss.
    lost_answers = result("lost answers", "ok", 0.3, 1.0)
    lost_answers.general_kept = 0.8
    assert best_variant([lost_answers, careful], min_general_kept=0.95).name == "careful"
    assert best_variant([lost_answers, careful]).name == "lost answers"
