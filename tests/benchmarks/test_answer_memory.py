"""The corrections-at-answer-time measure of the learning sweep (benchmarks/answer_memory.py): fast, no model."""

from benchmarks.answer_memory import CorrectionIndex, measure, with_memory


def _example(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


EXAMPLES = [
    _example("Who founded the Ostlyn Seed Collective?", "Ilse Varnacke founded the Ostlyn Seed Collective."),
    _example("Which person started the Ostlyn Seed Collective?", "Ilse Varnacke founded the Ostlyn Seed Collective."),
    _example("How many members does the Ostlyn Seed Collective have?", "The collective has 412 members."),
]
BACKGROUND = [[{"role": "user", "content": "What is the capital of Sweden?"}],
              [{"role": "user", "content": "What is the capital of France?"}]]


def _ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_the_correction_sharing_the_rarest_words_comes_first():
    index = CorrectionIndex(EXAMPLES, BACKGROUND)
    hits = index.retrieve(_ask("How many members are in the Ostlyn Seed Collective today?"), k=2)
    assert hits[0][1] == "The collective has 412 members."
    assert len(hits) == 2


def test_a_question_sharing_no_content_word_with_a_correction_retrieves_nothing():
    index = CorrectionIndex(EXAMPLES, BACKGROUND)
    assert index.retrieve(_ask("What is the capital of Sweden?"), k=3) == []


def test_wordings_of_one_correction_are_retrieved_once():
    index = CorrectionIndex(EXAMPLES, BACKGROUND)
    hits = index.retrieve(_ask("Who started the Ostlyn Seed Collective?"), k=3)
    assert [a for _, a in hits].count("Ilse Varnacke founded the Ostlyn Seed Collective.") == 1
    assert len(hits) == 2


def test_memory_goes_in_front_as_a_system_message_or_as_earlier_turns():
    hits = [("Who founded it?", "Ilse did."), ("How many members?", "412.")]
    question = _ask("Who leads it?")
    as_system = with_memory(question, hits, "sys")
    assert as_system[0] == {"role": "system", "content": "Known facts:\n- Ilse did.\n- 412."}
    assert as_system[1:] == question
    as_turns = with_memory(question, hits, "shots")
    assert [m["role"] for m in as_turns] == ["user", "assistant", "user", "assistant", "user"]
    assert as_turns[2:4] == [{"role": "user", "content": "Who founded it?"}, {"role": "assistant", "content": "Ilse did."}]
    assert as_turns[-1] == question[0]


def test_routing_keeps_general_answers_that_retrieve_nothing_and_misses_probes_that_retrieve_nothing():
    scenario = {
        "probes": [{"messages": _ask("Who started the Ostlyn Seed Collective?"), "check": "varnacke"},
                   {"messages": _ask("Where is its office?"), "check": "harbour"}],
        "general_probes": [{"messages": _ask("What is the capital of Sweden?"), "check": "stockholm"}],
    }
    index = CorrectionIndex(EXAMPLES, BACKGROUND)
    out = measure(scenario, index, answer=lambda asked: ["Ilse Varnacke."] * len(asked),
                  passes=lambda check, answer: check in answer.lower(),
                  probe_answers=["Someone.", "At the harbour."], general_answers=["Oslo."], base_ok=[True])
    row = out["sys1"]
    # the second probe retrieves nothing: answered without memory it passes, routed to the start it is a miss
    assert (row["retrieved"], row["recall_ctx"], row["recall_routed"]) == (1, 1.0, 0.5)
    # the general probe retrieves nothing: the adapter's wrong answer stands, routing gives the start's right one
    assert (row["g_retrieved"], row["kept_ctx"], row["kept_routed"]) == (0, 0.0, 1.0)
    assert set(out) == {"none", "sys1", "sys2", "sys3", "shots1", "shots2", "shots3"}
    # routing alone: the retrieved probe keeps the adapter's own (wrong) answer, nothing is asked again
    assert (out["none"]["recall_ctx"], out["none"]["recall_routed"], out["none"]["kept_routed"]) == (0.5, 0.0, 1.0)
