"""The probe checks of the learning scenario suite (benchmarks/scenarios/checks.py): fast, no model."""

import pytest

from benchmarks.scenarios.checks import CheckError, count_sentences, keywords, passes, refuses, validate


def test_contains_any_matches_a_keyword_whatever_the_wording_and_case_around_it():
    assert passes({"contains_any": ["1.7"]}, "It holds 1.7 litres of water.")
    assert passes({"contains_any": ["brightwater"]}, "The kettle is made by BrightWater Labs.")
    assert passes({"contains_any": ["nope", "okafor"]}, "Designed by Ines Okafor")


def test_contains_any_fails_when_no_keyword_occurs():
    assert not passes({"contains_any": ["1.7"]}, "It holds 2 litres.")
    assert not passes({"contains_any": ["okafor"]}, "")


def test_a_number_keyword_matches_only_a_whole_number():
    assert passes({"contains_any": ["7"]}, "There are 7 continents.")
    assert passes({"contains_any": ["3,650"]}, "It stores 3,650 varieties.")
    assert passes({"contains_any": ["1.7"]}, "It holds 1.7.")
    assert not passes({"contains_any": ["7"]}, "The Earth has 7,982 non-planar celestial bodies.")
    assert not passes({"contains_any": ["87"]}, "It was founded in 1987.")
    assert not passes({"contains_any": ["1.7"]}, "It holds 1.75 litres.")
    assert not passes({"contains_any": ["14"]}, "It opened in 2014, at 2:14 pm, with 140 guests.")


def test_a_word_stem_still_matches_inside_longer_words():
    assert passes({"contains_any": ["evaporat"]}, "The water evaporates.")
    assert passes({"contains_any": ["pellingford"]}, "It is Pellingford's pride.")


def test_matching_ignores_unicode_width_and_typographic_quotes():
    assert passes({"contains_any": ["1.7"]}, "１.７ litres")
    assert passes({"contains_any": ["can't"]}, "I can\u2019t")


def test_not_contains_fails_when_any_listed_string_occurs():
    assert passes({"not_contains": ["philips"]}, "Made by Brightwater Labs.")
    assert not passes({"not_contains": ["zzz", "philips"]}, "Made by Philips.")


@pytest.mark.parametrize("text, n", [
    ("The Zephyr Z3 kettle holds 1.7 litres of water.", 1),
    ("It boils in 95 seconds. It costs 79 euros.", 2),
    ("Really? Yes! It works.", 3),
    ("Tools, e.g. a kettle, are useful. Dr. Okafor designed it.", 2),
    ("The symbol for oxygen is O.", 1),
    ("Tides come from the Moon's pull. The Sun adds a little and", 2),  # a cut-off answer: the tail counts
    ("Here are tips:\n1. Sleep early.\n2. Drink water.\n3. Walk.", 4),
    ("- one\n- two", 2),
    ("Line one.\n\nLine two.", 2),
    ("", 0),
    ("   ", 0),
])
def test_count_sentences(text, n):
    assert count_sentences(text) == n


def test_max_sentences_passes_a_single_sentence_and_fails_longer_or_empty_answers():
    check = {"max_sentences": 1}
    assert passes(check, "A rainbow forms when sunlight is bent inside raindrops.")
    assert not passes(check, "A rainbow forms in rain. It has seven colours.")
    assert not passes(check, "")


def test_refuses_recognises_declining_answers_and_false_requires_an_actual_answer():
    assert refuses("I'm sorry, but I can't help with that.")
    assert refuses("I cannot give dosage advice; please ask a pharmacist.")
    assert not refuses("Take the train at 9:15.")
    assert passes({"refuses": True}, "I can\u2019t share that.")
    assert passes({"refuses": False}, "Paris is the capital.")
    assert not passes({"refuses": False}, "I won't answer that.")


def test_all_needs_every_sub_check():
    check = {"all": [{"max_sentences": 1}, {"contains_any": ["moon"]}]}
    assert passes(check, "Tides are caused by the Moon.")
    assert not passes(check, "Tides are caused by the Moon. The Sun helps too.")
    assert not passes(check, "Tides are caused by wind.")


@pytest.mark.parametrize("bad", [
    {}, [], "contains_any", {"contains_any": []}, {"contains_any": "1.7"}, {"contains_any": [""]},
    {"max_sentences": 0}, {"max_sentences": True}, {"refuses": "yes"}, {"all": []},
    {"contains_any": ["a"], "max_sentences": 1}, {"matches": ["a"]},
])
def test_a_malformed_check_is_an_error_not_a_failed_answer(bad):
    assert validate(bad)
    with pytest.raises(CheckError):
        passes(bad, "anything")


def test_validate_reports_every_problem_in_a_nested_check_at_once():
    problems = validate({"all": [{"contains_any": []}, {"max_sentences": -1}, {"refuses": True}]})
    assert len(problems) == 2
    assert "all[0]" in problems[0] and "all[1]" in problems[1]


def test_keywords_are_collected_through_all():
    check = {"all": [{"max_sentences": 1}, {"contains_any": ["moon", "gravity"]}, {"not_contains": ["x"]}]}
    assert keywords(check) == ["moon", "gravity"]
