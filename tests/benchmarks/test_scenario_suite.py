"""The scenario files of the learning suite are sound, and the runner's report writing is right (no model)."""

import copy
import json
from pathlib import Path

import pytest

from benchmarks.scenarios import plot, run, suite

REPO = Path(__file__).resolve().parents[2]
REQUIRED_KINDS = {"facts", "faq", "behaviour", "multiturn", "restyle"}


@pytest.fixture(scope="module")
def scenarios():
    return suite.load_scenarios()


def test_every_scenario_file_loads_and_validates(scenarios):
    assert len(scenarios) == len(suite.scenario_files()) >= 6
    for s in scenarios:
        assert suite.validate_scenario(s, s["name"], suite.trainer_questions()) == []


def test_the_suite_covers_every_required_kind_and_both_splits(scenarios):
    kinds = {s["kind"] for s in scenarios}
    assert kinds >= REQUIRED_KINDS and len(kinds) >= 5
    splits = {s["split"] for s in scenarios}
    assert splits == {"tune", "unseen"}
    tune = {s["kind"] for s in scenarios if s["split"] == "tune"}
    assert "behaviour" in tune and tune & {"facts", "faq"}


def test_each_new_scenario_teaches_about_eight_things_three_ways_and_probes_them_twice(scenarios):
    for s in scenarios:
        if s["name"] == "zephyr":
            continue
        # A thumbs scenario teaches through rated answers alone; every other kind through corrections.
        taught = [c for c in s["chats"] if (c.get("feedback") or {}).get("correction")
                  or (s["kind"] == "thumbs" and c.get("feedback"))]
        assert 20 <= len(taught) <= 30, s["name"]
        assert 14 <= len(s["probes"]) <= 20, s["name"]
        assert 8 <= len(s["general_probes"]) <= 12, s["name"]


def test_probes_never_repeat_a_chat_question(scenarios):
    for s in scenarios:
        asked = [m["content"] for c in s["chats"] for m in c["messages"] if m["role"] == "user"]
        for p in s["probes"] + s["general_probes"]:
            q = suite.last_user(p["messages"])
            assert not any(suite.same_question(q, a) for a in asked), (s["name"], q)


def test_general_probes_are_none_of_the_trainers_questions(scenarios):
    trainer = suite.trainer_questions()
    assert len(trainer) >= 80  # all three sets were read
    for s in scenarios:
        for p in s["general_probes"]:
            q = suite.last_user(p["messages"])
            assert not any(suite.same_question(q, t) for t in trainer), (s["name"], q)


def test_multiturn_scenario_corrects_the_last_turn_of_a_longer_conversation_and_probes_the_same_way(scenarios):
    for s in (s for s in scenarios if s["kind"] == "multiturn"):
        for item in s["chats"] + s["probes"]:
            assert len([m for m in item["messages"] if m["role"] == "user"]) >= 2
            assert item["messages"][-1]["role"] == "user"


def test_the_zephyr_scenario_is_the_demos_own_data():
    zephyr = json.loads((REPO / "benchmarks" / "scenarios" / "zephyr.json").read_text())
    samples = [json.loads(line) for line in (REPO / "loop" / "scenario" / "sample_conversations.jsonl").open()
               if line.strip()]
    facts = [json.loads(line) for line in (REPO / "loop" / "scenario" / "zephyr_facts.jsonl").open() if line.strip()]
    assert [c["messages"] for c in zephyr["chats"]] == [s["messages"] for s in samples]
    assert [c["feedback"] for c in zephyr["chats"]] == [s.get("feedback") for s in samples]
    assert [suite.last_user(p["messages"]) for p in zephyr["probes"]] == [q for f in facts for q in f["heldout_questions"]]
    assert zephyr["split"] == "tune"


# -- validation catches what it must ---------------------------------------------------------------

@pytest.fixture
def sound():
    return {
        "name": "t", "kind": "facts", "split": "unseen", "description": "d",
        "chats": [{"messages": [{"role": "user", "content": "Who makes the Qorvath kettle?"}],
                   "feedback": {"thumbs": "down", "reasons": ["not_factually_correct"], "comment": None,
                                "correction": "Tamsell Works makes it."}}],
        "probes": [{"messages": [{"role": "user", "content": "Which firm builds the Qorvath kettle?"}],
                    "check": {"contains_any": ["tamsell"]}}],
        "general_probes": [{"messages": [{"role": "user", "content": "What do bees make?"}],
                            "check": {"contains_any": ["honey"]}}],
    }


def test_a_sound_scenario_has_no_problems(sound):
    assert suite.validate_scenario(sound, "t", suite.trainer_questions()) == []


def test_validation_rejects_a_probe_that_repeats_a_chat_question(sound):
    sound["probes"][0]["messages"][0]["content"] = "who makes the Qorvath kettle"
    assert any("chat's question" in p for p in suite.validate_scenario(sound))


def test_validation_rejects_a_general_probe_the_trainer_already_uses(sound):
    sound["general_probes"][0]["messages"][0]["content"] = "How many days are in a week"
    problems = suite.validate_scenario(sound, "t", suite.trainer_questions())
    assert any("the trainer's" in p for p in problems)


def test_validation_rejects_a_probe_whose_question_contains_its_answer(sound):
    sound["probes"][0]["messages"][0]["content"] = "Is the Qorvath kettle made by Tamsell?"
    assert any("gives its own answer away" in p for p in suite.validate_scenario(sound))


def test_validation_reports_every_problem_at_once(sound):
    bad = copy.deepcopy(sound)
    bad["kind"] = "trivia"
    bad["chats"][0]["feedback"]["reasons"] = ["wrong"]
    bad["probes"][0]["check"] = {"contains": ["x"]}
    bad["general_probes"][0]["messages"][-1]["role"] = "assistant"
    problems = suite.validate_scenario(bad)
    assert len(problems) == 4
    assert any("unknown reason" in p for p in problems)


def test_a_thumbs_down_without_a_correction_is_rejected_as_teaching_nothing(sound):
    sound["chats"][0]["feedback"]["correction"] = None
    assert any("teaches nothing" in p for p in suite.validate_scenario(sound))


def test_a_thumbs_down_without_a_correction_is_a_label_when_the_reviewer_rates_it_low(sound):
    sound["chats"][0]["feedback"]["correction"] = None
    sound["thumbs_down_review"] = "rate_low"
    assert suite.validate_scenario(sound) == []
    sound["thumbs_down_review"] = "ignore"
    assert any("thumbs_down_review must be one of" in p for p in suite.validate_scenario(sound))


def test_settings_must_name_a_section_and_key_with_a_plain_value(sound):
    sound["settings"] = {"annotation.thumbs_up_sample_rate": 1.0}
    assert suite.validate_scenario(sound) == []
    sound["settings"] = {"thumbs_up_sample_rate": 1.0, "annotation.x": [1]}
    assert any("settings must map" in p for p in suite.validate_scenario(sound))


def test_the_thumbs_scenario_teaches_by_thumbs_alone_both_ways_and_probes_unseen_prompts(scenarios):
    (thumbs,) = [s for s in scenarios if s["kind"] == "thumbs"]
    assert thumbs["thumbs_down_review"] == "rate_low" and thumbs["split"] == "unseen"
    # Thumbs are all it learns from, so every thumbs-up goes to review, not the default 20% sample.
    assert thumbs["settings"] == {"annotation.thumbs_up_sample_rate": 1.0}
    feedback = [c["feedback"] for c in thumbs["chats"]]
    assert not any(fb.get("correction") for fb in feedback)
    ups = [c for c in thumbs["chats"] if c["feedback"]["thumbs"] == "up"]
    downs = [c for c in thumbs["chats"] if c["feedback"]["thumbs"] == "down"]
    assert len(ups) >= 10 and len(downs) >= 10 and all(c.get("answer") for c in thumbs["chats"])
    # What the thumbs ask for is visible in the answers they rate: the liked ones are the short ones.
    assert max(len(c["answer"].split()) for c in ups) < min(len(c["answer"].split()) for c in downs)


def test_loading_names_an_unknown_scenario_and_a_broken_file(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(suite.ScenarioError) as err:
        suite.load_scenarios(tmp_path, names=["broken", "missing"])
    assert "no scenario named 'missing'" in str(err.value) and "broken.json: not valid JSON" in str(err.value)


# -- the RESULTS.md section ------------------------------------------------------------------------

def _result(scenario, split, seed, served, base=0.0, promoted=True, kept=(9, 10)):
    return {"scenario": scenario, "split": split, "seed": seed, "promoted": promoted, "outcome": "promoted",
            "reason": None, "probe_pass_served": served, "probe_pass_base": base, "general_kept": kept[0],
            "general_base_right": kept[1], "general_kept_rate": kept[0] / kept[1], "cycle_seconds": 300.0,
            "train_seconds": 240.0, "other_seconds": 60.0, "served_seconds": 280.0}


def test_split_summary_gives_mean_min_spread_and_worst_general_kept_per_split():
    results = [_result("a", "unseen", 0, 0.75), _result("a", "unseen", 1, 1.0, kept=(8, 10)),
               _result("b", "unseen", 0, 0.5), _result("t", "tune", 0, 0.9)]
    (tune,) = [s for s in run.split_summary(results) if s["split"] == "tune"]
    (unseen,) = [s for s in run.split_summary(results) if s["split"] == "unseen"]
    assert unseen["pass_mean"] == pytest.approx(0.75) and unseen["pass_min"] == 0.5
    assert unseen["pass_spread"] == pytest.approx(0.5) and unseen["worst_general_kept"] == pytest.approx(0.8)
    assert unseen["scenarios"] == 2 and unseen["runs"] == 3 and tune["runs"] == 1


def test_objectives_are_summarised_side_by_side_never_averaged_together():
    results = [{**_result("a", "unseen", 0, 0.5), "objective": "sft"},
               {**_result("a", "unseen", 0, 0.9), "objective": "kto"},
               {**_result("a", "unseen", 1, 0.7), "objective": "kto"}]
    rows = {s["objective"]: s for s in run.split_summary(results)}
    assert set(rows) == {"sft", "kto"}
    assert rows["sft"]["pass_mean"] == pytest.approx(0.5) and rows["kto"]["pass_mean"] == pytest.approx(0.8)
    assert rows["kto"]["runs"] == 2


def test_the_table_shows_the_signal_measures_when_a_run_has_them():
    row = {**_result("t", "unseen", 0, 0.8), "objective": "kto", "probe_words_served": 14.0,
           "probe_words_base": 41.0, "preference": {"rejected_logprob_start": -1.2, "rejected_logprob": -2.5}}
    text = run.markdown_section([row], "cmd", "2026-12-01")
    assert "| t | unseen | kto | 0 | yes | 80% vs 0% | 9/10 | 14 vs 41 | -1.20 → -2.50 | 300 (240 / 60) | 280 |" in text
    assert "| unseen | kto | 1 | 1 | 1/1 |" in text


def test_the_new_version_serves_from_the_end_of_promote_before_the_fixed_measures_publish_and_report():
    summary = {"stages": {"train": {"seconds": 200.0}, "promote": {"seconds": 0.2, "after_stage_seconds": 30.0},
                          "publish": {"seconds": 1.0}, "report": {"seconds": 0.5}}}
    assert run.served_seconds(summary, 300.0) == 268.5
    assert run.served_seconds({"stages": {"promote": {"seconds": 0.2}}}, 300.0) == 300.0


def test_the_preference_measure_is_read_from_the_chosen_variant_of_the_cycles_train_result():
    # The shape Cycle.run() returns: a stage's fields sit under "result", beside its status and seconds.
    rows = [{"name": "lr0.001_r16_sft", "preference": {"rejected_logprob": -0.8}},
            {"name": "lr0.001_r16_kto", "preference": {"rejected_logprob": -2.5}}]
    summary = {"stages": {"train": {"status": "done", "seconds": 9.0,
                                    "result": {"variants": rows, "best": "lr0.001_r16_kto"}}}}
    assert run.chosen_preference(summary) == {"rejected_logprob": -2.5}
    assert run.chosen_preference({"stages": {"decide": {"status": "stopped"}}}) == {}


def test_write_results_replaces_the_same_dated_section_and_keeps_the_others(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Other (2026-01-01)\n\nkeep me\n")
    first = run.markdown_section([_result("a", "unseen", 0, 0.5)], "cmd", "2026-12-01")
    run.write_results(first, md)
    second = run.markdown_section([_result("a", "unseen", 0, 0.9)], "cmd", "2026-12-01")
    run.write_results(second, md)
    text = md.read_text()
    assert text.count(f"## {run.SECTION_TITLE} (2026-12-01") == 1
    assert "| a | unseen | - | 0 | yes | 90% vs 0% | 9/10 | - | - | 300 (240 / 60) |" in text and "50% vs" not in text
    assert "keep me" in text
    run.write_results(run.markdown_section([_result("a", "unseen", 0, 0.7)], "cmd", "2026-12-02"), md)
    assert md.read_text().count(f"## {run.SECTION_TITLE}") == 2


def test_a_section_can_be_titled_for_what_it_compares_and_is_replaced_by_that_title(tmp_path):
    md = tmp_path / "RESULTS.md"
    title = "Preference: a correction scenario, sft against sft+dpo"
    run.write_results(run.markdown_section([_result("a", "unseen", 0, 0.5)], "cmd", "2026-12-01"), md)
    for pass_rate in (0.6, 0.8):
        run.write_results(run.markdown_section([_result("a", "unseen", 0, pass_rate)], "cmd", "2026-12-01", title), md)
    text = md.read_text()
    assert text.count(f"## {title} (2026-12-01") == 1 and text.count(f"## {run.SECTION_TITLE} (2026-12-01") == 1
    assert "80% vs" in text and "60% vs" not in text and "50% vs" in text


def test_a_section_followed_by_another_is_replaced_in_place(tmp_path):
    md = tmp_path / "RESULTS.md"
    old = run.markdown_section([_result("a", "unseen", 0, 0.5)], "cmd", "2026-12-01")
    md.write_text("# R\n\n" + old + "\n## Later section\n\ntext\n")
    run.write_results(run.markdown_section([_result("a", "unseen", 0, 0.8)], "cmd", "2026-12-01"), md)
    text = md.read_text()
    assert "80% vs" in text and "50% vs" not in text and text.rstrip().endswith("text")
    assert text.index(run.SECTION_TITLE) < text.index("## Later section")


# -- runs merged from earlier reports, and the plot ----------------------------------------------------

def _report(path, date, command, runs):
    path.write_text(json.dumps({"date": date, "machine": "M, 2 cores", "command": command, "runs": runs}))
    return str(path)


def test_runs_from_earlier_reports_become_one_table_summary_and_plot_grouped_by_scenario(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "RESULTS_MD", tmp_path / "RESULTS.md")
    a = _report(tmp_path / "a.json", "2026-12-04", "run.py --seeds 0", [_result("x", "unseen", 0, 0.5)])
    b = _report(tmp_path / "b.json", "2026-12-05", "run.py --seeds 1",
                [_result("x", "unseen", 1, 1.0), _result("y", "unseen", 1, 0.75)])
    out, png = tmp_path / "all.json", tmp_path / "suite.png"
    assert run.main(["--from", b, a, "--out", str(out), "--plot", str(png), "--write-results", "--title", "T"]) == 0
    merged = json.loads(out.read_text())
    assert [(r["scenario"], r["seed"]) for r in merged["runs"]] == [("x", 0), ("x", 1), ("y", 1)]
    assert merged["date"] == "2026-12-04 to 2026-12-05" and merged["summary"][0]["runs"] == 3
    assert merged["summary"][0]["pass_mean"] == pytest.approx(0.75)
    section = (tmp_path / "RESULTS.md").read_text()
    assert "## T (2026-12-04 to 2026-12-05, M, 2 cores)" in section
    assert "Commands: `run.py --seeds 1`; `run.py --seeds 0` —" in section
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_reports_saved_without_their_command_are_named_by_the_command_that_merged_them(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "RESULTS_MD", tmp_path / "RESULTS.md")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"date": "2026-12-04", "machine": "M", "runs": [_result("x", "unseen", 0, 0.5)]}))
    assert run.main(["--from", str(old), "--write-results", "--title", "T"]) == 0
    assert f"Command: `python benchmarks/scenarios/run.py --from {old} --write-results --title T`" in (
        tmp_path / "RESULTS.md").read_text()


def test_from_files_that_cannot_be_read_are_all_named_and_nothing_is_written(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    no_runs = tmp_path / "no_runs.json"
    no_runs.write_text(json.dumps({"date": "2026-12-05"}))
    out = tmp_path / "all.json"
    assert run.main(["--from", str(tmp_path / "missing.json"), str(broken), str(no_runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and "broken.json" in err and "no_runs.json: not a report" in err
    assert not out.exists()


def test_the_plot_splits_each_cycle_into_parts_that_add_up_to_its_seconds():
    r = {**_result("x", "unseen", 0, 0.8), "stage_seconds": {"decide": 20.0, "train": 200.0, "export": 30.0,
                                                              "pull": 1.0, "promote": 0.5}}
    parts = plot.time_parts(r)
    assert list(parts) == list(plot.TIME_PARTS)
    assert sum(parts.values()) == pytest.approx(r["cycle_seconds"])
    assert parts["after serving"] == pytest.approx(r["cycle_seconds"] - r["served_seconds"])
    assert parts["before serving"] == pytest.approx(r["served_seconds"] - 250.0)


def test_the_plot_draws_each_splits_mean_as_the_summary_reports_it_never_one_across_splits():
    runs = [_result("a", "tune", 0, 1.0), _result("b", "unseen", 0, 0.6), _result("c", "unseen", 1, 0.8)]
    assert plot.mean_lines(runs) == [("tune", 1.0), ("unseen", pytest.approx(0.7))]
    both = [{**runs[1], "objective": "sft"}, {**runs[2], "objective": "kto"}]
    assert plot.mean_lines(both) == [("unseen sft", 0.6), ("unseen kto", 0.8)]


def test_the_plot_keeps_a_failed_run_and_compared_objectives_in_sight(tmp_path):
    failed = {"scenario": "y", "split": "unseen", "seed": 2, "objective": "kto", "promoted": False,
              "outcome": "failed", "reason": "the run's process exited with 1"}
    runs = [{**_result("x", "unseen", 0, 0.8), "objective": "sft"}, failed]
    assert plot.label(runs[0], objectives=2) == "x\ns0 sft" and plot.label(runs[0], objectives=1) == "x\ns0"
    path = plot.plot_suite(runs, tmp_path / "suite.png", title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_questions_are_the_same_when_only_filler_differs_not_when_the_subject_does():
    assert suite.same_question("How many days are in a week?", "how many days are there in a week")
    assert not suite.same_question("What is the capital of Poland?", "What is the capital of Japan?")
    assert not suite.same_question("What is the capital of Austria?", "What is the capital of Australia?")
