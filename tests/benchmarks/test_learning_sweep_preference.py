"""The tuning sweep's preference data is what the scripted reviewer's verdicts give a cycle."""

from benchmarks.learning_sweep import curated_examples, preference_rows


def _scenario(thumbs_down_review: str) -> dict:
    ask = [{"role": "user", "content": "Q?"}]
    return {"name": "s", "thumbs_down_review": thumbs_down_review, "chats": [
        {"messages": ask, "feedback": {"thumbs": "down", "correction": "Right."}},
        {"messages": ask, "feedback": {"thumbs": "down", "correction": "Same answer"}},
        {"messages": ask, "answer": "Good.", "feedback": {"thumbs": "up"}},
        {"messages": ask, "answer": "Long.", "feedback": {"thumbs": "down"}},
        {"messages": ask, "feedback": None},
    ]}


def test_a_correction_is_a_pair_and_an_undesirable_label_unless_it_repeats_the_logged_answer():
    pairs, labels = preference_rows(_scenario("discard"), ["Wrong.", "same answer!", "Good.", "Long.", "Hi."])
    assert pairs == [{"id": "s-000", "prompt": [{"role": "user", "content": "Q?"}], "chosen": "Right.",
                      "rejected": "Wrong."}]
    assert [(row["id"], row["answer"], row["label"]) for row in labels] == [
        ("s-000", "Wrong.", "undesirable"), ("s-001", "same answer!", "undesirable"), ("s-002", "Good.", "desirable")]


def test_a_thumbs_down_without_correction_is_an_undesirable_label_only_when_the_reviewer_rates_it_low():
    logged = ["Wrong.", "x", "Good.", "Long.", "Hi."]
    _, discarded = preference_rows(_scenario("discard"), logged)
    _, rated = preference_rows(_scenario("rate_low"), logged)
    assert "s-003" not in {row["id"] for row in discarded}
    assert ("s-003", "undesirable") in {(row["id"], row["label"]) for row in rated}


def test_preference_ids_are_the_curated_examples_ids_so_the_judge_holds_them_out_alike():
    scenario = _scenario("rate_low")
    pairs, labels = preference_rows(scenario, ["Wrong.", "x", "Good.", "Long.", "Hi."])
    example_ids = {e["id"] for e in curated_examples(scenario)}
    assert {row["id"] for row in pairs} <= example_ids
    assert {row["id"] for row in labels if row["id"] != "s-003"} <= example_ids
