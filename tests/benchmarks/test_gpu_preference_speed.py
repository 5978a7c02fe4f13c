"""The GPU preference-speed benchmark (benchmarks/gpu_preference_speed.py) runs end to end on a CPU: the tiny
architecture, two steps of each objective through the trainer's own builders, one JSON line per objective."""

import json

import pytest

from benchmarks.gpu_preference_speed import OBJECTIVES, kto_rows, main, make_rows, report, sft_rows


def test_synthetic_rows_have_the_asked_lengths_and_half_the_labels_desirable():
    pairs = make_rows(200, 128256, seed=1)
    prompts = [len(r["prompt_ids"]) for r in pairs]
    answers = [len(r["chosen_ids"]) for r in pairs] + [len(r["rejected_ids"]) for r in pairs]
    assert 180 < sum(prompts) / len(prompts) < 220
    assert 160 < sum(answers) / len(answers) < 220
    assert all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 512 for r in pairs)
    labels = kto_rows(pairs)
    assert sum(r["label"] for r in labels) == 100
    sft = sft_rows(pairs)
    assert all(len(s["input_ids"]) == len(s["labels"]) for s in sft)
    assert sft[0]["labels"][:len(pairs[0]["prompt_ids"])] == [-100] * len(pairs[0]["prompt_ids"])


def test_dry_run_on_cpu_writes_one_row_per_objective_and_leaves_no_scratch_behind(tmp_path, monkeypatch, capsys):
    import tempfile

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "rows.jsonl"
    main(["dry-run", "--out", str(out)])
    # the random model and every Trainer directory are removed (torch may keep its own compile cache there)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("pref-bench")] == []
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["objective"] for r in rows] == list(OBJECTIVES)
    for r in rows:
        assert "error" not in r, r
        assert r["steps"] == 2 and r["real_tokens_per_s"] > 0 and r["steps_per_s"] > 0
    by = {r["objective"]: r for r in rows}
    assert by["dpo"]["sequences_per_step"] == 8  # chosen and rejected of 4 pairs
    assert by["dpo"]["forward_tokens_per_s"] == pytest.approx(2 * by["dpo"]["real_tokens_per_s"])  # + reference
    assert by["kto"]["forward_tokens_per_s"] > 2 * by["kto"]["real_tokens_per_s"]  # + KL answers, + reference
    assert abs(by["dpo"]["loss_first"] - 0.6931) < 0.01  # ln 2: policy = reference at the start
    table = report(out)
    assert "| dpo |" in table and "| kto |" in table and "| sft |" in table
