"""The cycle report sets every variant of the grid side by side, whatever its objective."""

from loop.report import variants_table


def test_the_report_shows_each_objectives_losses_gate_numbers_preference_measure_and_why_one_was_skipped():
    variants = [
        {"name": "lr0.001_r16", "objective": "sft", "status": "ok", "eval_loss": 0.31, "eval_loss_start": 2.1,
         "regression_loss": 0.9, "regression_loss_start": 1.0, "general_kept": 0.9, "tokens_per_s": 120.0,
         "wall_s": 300.0, "preference": {"win_rate": 0.75, "margin": 0.4}},
        {"name": "lr0.001_r16_sft+dpo", "objective": "sft+dpo", "status": "ok", "eval_loss": 0.35,
         "eval_loss_start": 2.1, "regression_loss": 1.1, "regression_loss_start": 1.0, "general_kept": 1.0,
         "preference": {"win_rate": 1.0, "margin": 1.9},
         "reason": "the DPO stage was refused (held-out loss 7.0 | worse); the variant is its SFT stage"},
        {"name": "lr0.001_r16_kto", "objective": "kto", "status": "skipped",
         "reason": "only undesirable labels (16): KTO needs desirable and undesirable answers to tell apart"},
    ]
    header, rule, sft, dpo, kto = variants_table(variants)
    assert header.count("|") == rule.count("|") == sft.count("|") == dpo.count("|") == kto.count("|")
    assert "| sft | ok | 0.3100 (2.1000) | -10.0% | 90% | 75% (+0.40) |" in sft
    assert "| sft+dpo | ok | 0.3500 (2.1000) | +10.0% | 100% | 100% (+1.90) |" in dpo
    assert "held-out loss 7.0 / worse" in dpo  # a reason never breaks the table
    assert "| kto | skipped | — | — | — | — |" in kto and "only undesirable labels (16)" in kto
